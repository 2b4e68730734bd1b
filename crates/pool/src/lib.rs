//! Storage pools for vmvol.
