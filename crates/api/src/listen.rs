//! Where the service listens and who may talk to it: an owner-only Unix
//! socket, or TCP behind a bearer token.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::error::ApiError;

/// Binds a Unix socket at `path` with mode 0600 (owner only), like Cloud
/// Hypervisor's API socket. The socket is made in a private (0700)
/// directory beside `path`, set to 0600, then renamed into place, so no
/// other user can connect in between. A stale socket at `path` is
/// replaced; any other file there is refused. Call inside a tokio runtime.
pub fn bind_unix(path: &Path) -> io::Result<tokio::net::UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = tempfile::Builder::new()
        .prefix(".vmvol-sock-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)?;
    let tmp = private.path().join("s");
    let l = std::os::unix::net::UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}

/// `router` with every request required to carry `Authorization: Bearer
/// <token>` (compared in constant time); 401 otherwise. For TCP listeners.
pub fn require_token(router: Router, token: String) -> Router {
    let token: Arc<[u8]> = token.into_bytes().into();
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let token = token.clone();
            async move {
                let given = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
                match given {
                    Some(g) if ct_eq(g, &token) => next.run(req).await,
                    _ => unauthorized(),
                }
            }
        },
    ))
}

fn unauthorized() -> Response {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "request: a valid bearer token is required",
    )
    .into_response()
}

/// Equal bytes, taking the same time wherever they differ (the length is
/// not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() || b.is_empty() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::ct_eq;

    #[test]
    fn ct_eq_compares_whole_tokens() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secreT", b"secret"));
        assert!(!ct_eq(b"secret!", b"secret"));
        assert!(!ct_eq(b"", b""));
    }
}
