"""`mergekit-sd` that says the render estimate whatever the time left (its threshold at 0), for
tests that need a child process: a terminal's progress bar draws only there."""

from mergekit_sd.cli import main
from mergekit_sd.render import estimate

if __name__ == "__main__":
    estimate.WORTH_SAYING_S = 0.0
    main()
