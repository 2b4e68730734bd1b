//! Bad input: each refused with a specific error, nothing written, no panic.
