"""`python -m experiments.chat` from a checkout (installed: `lcjax-chat`).

The job itself is `lcjax.jobs.chat`."""

from lcjax.jobs.chat import main

if __name__ == "__main__":
    main()
