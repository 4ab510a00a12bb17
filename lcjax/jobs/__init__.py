"""The jobs users run: each module's `main(argv)` is a console entry point (`lcjax-<job>`) and the body of
`python -m experiments.<job>`."""
