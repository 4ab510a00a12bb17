"""`python -m experiments.finetune` from a checkout (installed: `lcjax-finetune`).

The job itself is `lcjax.jobs.finetune`."""

from lcjax.jobs.finetune import main

if __name__ == "__main__":
    main()
