"""``python -m platform`` behaves as the standard library's: it prints the platform string."""

import sys

import platform

terse = "terse" in sys.argv or "--terse" in sys.argv
aliased = "nonaliased" not in sys.argv and "--nonaliased" not in sys.argv
print(platform.platform(aliased, terse))
