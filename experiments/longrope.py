"""`python -m experiments.longrope` from a checkout.

The job itself is `lcjax.jobs.longrope`."""

from lcjax.jobs.longrope import main

if __name__ == "__main__":
    main()
