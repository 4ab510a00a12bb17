"""`python -m experiments.scbench` from a checkout (installed: `lcjax-scbench`).

The job itself is `lcjax.jobs.scbench`."""

from lcjax.jobs.scbench import main

if __name__ == "__main__":
    main()
