"""The demos behind `functional-probe demo`: rollouts on the tiny built-in model, and a real one.

Not part of the library's API: the code a demo needs (synthetic rollouts, arithmetic prompts and
their verifier) lives here so that the library package holds only the library.
"""
