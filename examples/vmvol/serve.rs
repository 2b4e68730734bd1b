//! `vmvol serve`: the HTTP API (vmvol-api) on an owner-only Unix socket, or
//! on TCP behind a bearer token.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use vmvol::pool::Registry;
use vmvol::volume::Volumes;
use vmvol_api::{bind_unix, require_token, service, ApiConfig};

use super::volume::Common;
use super::AnyResult;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Unix socket to listen on, created with mode 0600 (default: <root>/api.sock).
    #[arg(long, conflicts_with = "listen")]
    socket: Option<PathBuf>,
    /// Listen on TCP at ADDR (e.g. 127.0.0.1:8080) instead; needs --token-file.
    #[arg(long, requires = "token_file")]
    listen: Option<SocketAddr>,
    /// File holding the bearer token TCP clients must send.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// A directory images and archives may be imported from by path (repeatable).
    #[arg(long = "import-root")]
    import_roots: Vec<PathBuf>,
    /// The pool the /volumes API works on.
    #[arg(long, default_value = "default")]
    default_pool: String,
    /// Where uploaded archives wait while a volume is built (default: the system's temporary directory).
    #[arg(long)]
    upload_dir: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> AnyResult<()> {
    let root = args
        .common
        .root
        .clone()
        .unwrap_or_else(Registry::default_root);
    let vols: Volumes = args.common.volumes()?;
    let mut cfg = ApiConfig {
        default_pool: args.default_pool,
        import_roots: args.import_roots,
        ..ApiConfig::default()
    };
    if let Some(d) = args.upload_dir {
        cfg.upload_dir = d;
    }
    let (app, handle) = service(vols, cfg);
    let rt = tokio::runtime::Runtime::new()?;
    let res = rt.block_on(async move {
        if let Some(addr) = args.listen {
            let file = args.token_file.ok_or("--listen needs --token-file")?;
            let token = std::fs::read_to_string(&file)
                .map_err(|e| format!("{}: read token: {e}", file.display()))?
                .trim()
                .to_string();
            if token.len() < 16 {
                return Err(format!(
                    "{}: token: refused, shorter than 16 characters",
                    file.display()
                )
                .into());
            }
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("{addr}: listen: {e}"))?;
            eprintln!(
                "vmvol: serving on http://{} (bearer token required)",
                l.local_addr()?
            );
            axum::serve(l, require_token(app, token))
                .with_graceful_shutdown(stop())
                .into_future()
                .await?;
        } else {
            std::fs::create_dir_all(&root)?;
            let sock = args.socket.unwrap_or_else(|| root.join("api.sock"));
            let l = bind_unix(&sock).map_err(|e| format!("{}: listen: {e}", sock.display()))?;
            eprintln!("vmvol: serving on unix:{} (mode 0600)", sock.display());
            let res = axum::serve(l, app)
                .with_graceful_shutdown(stop())
                .into_future()
                .await;
            let _ = std::fs::remove_file(&sock);
            res?;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    // Jobs still running are cancelled (each removes its staging area);
    // dropping the runtime then waits for them to return.
    let n = handle.cancel_jobs();
    if n > 0 {
        eprintln!("vmvol: cancelled {n} running job(s)");
    }
    drop(rt);
    res
}

/// Resolves on SIGINT or SIGTERM: the server stops accepting, finishes the
/// requests in flight, and returns.
async fn stop() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
