"""Safety layer: request harm assessment, refusal detection on output, and the policy.

Imports are kept explicit per module (``salon.safety.harm`` etc.) so that loading the policy
does not load the models.
"""
