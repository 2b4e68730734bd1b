//! Backends that live in other crates (Ceph RBD in `vmvol-rbd`), which this
//! crate cannot depend on: they register a [`BackendProvider`] once per
//! process, and every [`Registry`](crate::Registry) then defines, opens and
//! undefines pools of that backend type.

use std::sync::{Arc, RwLock};

use crate::backend::PoolBackend;
use crate::error::Result;
use crate::spec::BackendSpec;

/// How the registry creates and opens pools of one backend type.
pub trait BackendProvider: Send + Sync {
    /// The [`BackendSpec::type_name`] it serves (`"rbd"`).
    fn type_name(&self) -> &'static str;
    /// Creates a pool's layout on `spec` holding the config record `config`
    /// (refused if a pool is there already).
    fn create(&self, spec: &BackendSpec, config: &[u8]) -> Result<()>;
    /// Opens the pool on `spec`.
    fn open(&self, spec: &BackendSpec) -> Result<Arc<dyn PoolBackend>>;
}

static PROVIDERS: RwLock<Vec<Arc<dyn BackendProvider>>> = RwLock::new(Vec::new());

/// Makes `provider` serve its backend type for every registry of this
/// process; a later registration for the same type replaces it.
pub fn register_backend(provider: Arc<dyn BackendProvider>) {
    let mut v = PROVIDERS.write().unwrap_or_else(|e| e.into_inner());
    v.retain(|p| p.type_name() != provider.type_name());
    v.push(provider);
}

/// The provider registered for `type_name`, if any.
pub(crate) fn provider(type_name: &str) -> Option<Arc<dyn BackendProvider>> {
    PROVIDERS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|p| p.type_name() == type_name)
        .cloned()
}
