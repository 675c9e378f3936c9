"""Ray job entry points, job specs, submission and the `hindsight` command line.

The only floor that knows all the others: schemas -> engine, relabelers -> trainers -> jobs.
"""
