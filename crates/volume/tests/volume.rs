//! The volume layer's test suite, against real tools.
