"""`python -m experiments.minference_search` from a checkout (installed: `lcjax-minference-search`).

The job itself is `lcjax.jobs.minference_search`."""

from lcjax.jobs.minference_search import main

if __name__ == "__main__":
    main()
