"""`python -m experiments.context_eval` from a checkout.

The job itself is `lcjax.jobs.context_eval`."""

from lcjax.jobs.context_eval import main

if __name__ == "__main__":
    main()
