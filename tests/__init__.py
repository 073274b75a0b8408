"""tdproxy's tests: ``unit`` (pure code), ``integration`` (real processes), ``fakes``."""
