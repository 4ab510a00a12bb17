"""`python -m experiments.minference_accuracy` from a checkout (installed: `lcjax-minference-accuracy`).

The job itself is `lcjax.jobs.minference_accuracy`."""

from lcjax.jobs.minference_accuracy import main

if __name__ == "__main__":
    main()
