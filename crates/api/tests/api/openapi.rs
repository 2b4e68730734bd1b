//! The served OpenAPI document: complete, and a schema-driven fuzzer
//! (schemathesis) finds no 5xx and no answer outside it.

use std::future::IntoFuture;
use std::process::Command;

use serde_json::json;
use vmvol_api::{require_token, router, ApiConfig};
use vmvol_pool::Registry;
use vmvol_volume::Volumes;

use crate::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_covers_every_endpoint_body_and_error() {
    let s = Server::start().await;
    let (st, doc) = s.call("GET", "/openapi.json", None).await;
    assert_eq!(st, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let mut want: Vec<String> = [
        "create-volume",
        "delete-volume",
        "list-volumes",
        "describe-volume",
        "resize-volume",
        "clone-volume",
        "compress-volume",
        "define-pool",
        "list-pools",
        "describe-pool",
        "activate-pool",
        "deactivate-pool",
        "undefine-pool",
        "create-template",
        "list-templates",
        "describe-template",
        "delete-template",
        "create-snapshot",
        "list-snapshots",
        "describe-snapshot",
        "delete-snapshot",
        "cancel-job",
        "attach-instance",
        "detach-instance",
        "describe-instance",
        "list-instances",
    ]
    .iter()
    .map(|p| format!("/api/{p}"))
    .collect();
    want.extend(["/api/jobs/{id}", "/volumes", "/volumes/{id}"].map(String::from));
    for p in &want {
        let ops = paths
            .get(p)
            .unwrap_or_else(|| panic!("{p} missing"))
            .as_object()
            .unwrap();
        for (method, op) in ops {
            for code in ["400", "404", "409", "413", "500", "507"] {
                assert!(
                    op["responses"].get(code).is_some(),
                    "{method} {p}: no {code}"
                );
            }
            if method == "post" && p != "/api/list-pools" && p != "/api/list-instances" {
                assert!(op.get("requestBody").is_some(), "{method} {p}: no body");
            }
        }
    }
    assert_eq!(paths.len(), want.len(), "undocumented or extra paths");
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for t in [
        "ErrorBody",
        "CreateVolumeRequest",
        "Volume",
        "JobView",
        "SizeArg",
    ] {
        assert!(schemas.contains_key(t), "{t} missing");
    }
    // Every route answers as documented: a request body type for each POST.
    let cv = &paths["/api/create-volume"]["post"]["requestBody"]["content"]["application/json"];
    assert!(cv["schema"]["$ref"]
        .as_str()
        .unwrap()
        .ends_with("CreateVolumeRequest"));
    let mp = &paths["/volumes"]["post"]["requestBody"]["content"];
    assert!(mp.get("multipart/form-data").is_some() && mp.get("application/json").is_some());
}

/// schemathesis from PyPI (`.ci/run` installs it): `st`, or the module
/// when pip's scripts directory is not on PATH. The program and its first
/// arguments.
fn schemathesis() -> Option<(&'static str, &'static [&'static str])> {
    let candidates: [(&'static str, &'static [&'static str]); 2] =
        [("st", &[]), ("python3", &["-m", "schemathesis.cli"])];
    for (prog, pre) in candidates {
        let ok = Command::new(prog)
            .args(pre)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some((prog, pre));
        }
    }
    if std::env::var("VMVOL_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
        panic!("schemathesis is not installed, and VMVOL_REQUIRE_TOOLS=1 requires it");
    }
    eprintln!("skipped: schemathesis is not installed (pip install schemathesis)");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_5xx_and_no_answer_outside_the_schema() {
    let Some((st, pre)) = schemathesis() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let vols = Volumes::new(Registry::open(dir.path().join("reg")).unwrap());
    // A small quota bounds what fuzzed creates can write.
    let spec = vmvol_pool::PoolSpec {
        capacity: vmvol_pool::CapacityPolicy::Quota { bytes: 256 << 20 },
        ..Default::default()
    };
    vols.registry().define("default", &spec).unwrap();
    vols.registry()
        .activate("default", vmvol_pool::Wait::Block)
        .unwrap();
    let token = "fuzz-token-0123456789";
    let cfg = ApiConfig {
        upload_dir: dir.path().to_path_buf(),
        ..ApiConfig::default()
    };
    let app = require_token(router(vols, cfg), token.into());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(axum::serve(l, app).into_future());
    let _ = json!({});

    let examples = std::env::var("VMVOL_FUZZ_EXAMPLES").unwrap_or_else(|_| "30".into());
    // schemathesis keeps a cache in its working directory: keep it in the scratch one.
    let work = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(st)
            .current_dir(work)
            .args(pre)
            .args(["run", &format!("http://{addr}/openapi.json")])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            ])
            .args(["--phases", "examples,coverage,fuzzing"])
            // Pools are defined by the test: fuzzed pools would use the
            // whole filesystem as their capacity.
            .args(["--exclude-path", "/api/define-pool"])
            .args(["--max-examples", &examples, "--seed", "12", "--workers", "2"])
            .args(["--no-color", "--warnings", "off"])
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    eprintln!(
        "{}",
        text.lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
