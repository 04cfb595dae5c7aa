"""Data defaults every entry point shares. Import-light on purpose (no torch): ``detkd.config`` reads it."""

# The longer image side, in pixels, when nothing else says: recipes, ViewPolicy, `detkd data` previews,
# and the size a checkpoint without a recorded recipe is evaluated or exported at.
INPUT_SIZE = 128
BATCH_SIZE = 8
