//! Files of the repository that no other test exercises: docker-compose.yml, the Dockerfile,
//! the OpenAPI document, and the layering of the source (the wire side never imports the server).

use serde_norway::Value;

#[test]
fn docker_compose_parses_and_names_the_services() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .unwrap();
    let doc: Value = serde_norway::from_str(&text).unwrap();
    let services = doc["services"].as_mapping().expect("services");
    for name in ["nats", "postgres", "coordinator", "worker"] {
        assert!(services.contains_key(name), "service {name}");
    }
    let worker = &doc["services"]["worker"];
    // `--scale worker=N` needs replicas that do not clash.
    assert!(worker.get("container_name").is_none());
    assert!(worker.get("ports").is_none());
    assert!(
        worker["environment"].get("OMOI_DATABASE_URL").is_none(),
        "workers are NATS-only"
    );
    assert_eq!(worker["command"][0], "worker");
    assert_eq!(doc["services"]["coordinator"]["command"][0], "coordinator");
    let nats_cmd = doc["services"]["nats"]["command"].as_sequence().unwrap();
    assert!(
        nats_cmd
            .iter()
            .any(|a| a.as_str() == Some("/etc/nats/nats-server.conf"))
    );
    let conf = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/nats/nats-server.conf"
    ))
    .unwrap();
    assert!(conf.contains("jetstream"));
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    assert!(dockerfile.contains("--bin omoi") && dockerfile.contains("ENTRYPOINT [\"omoi\"]"));
}

/// Adds the Rust files under `path` (or `path` itself) to `out`.
fn walk(path: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap().flatten() {
            walk(&entry.path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

/// The worker, the clients and the wire contract speak through `protocol/` and `bus/` only: none
/// of them imports `service/` or `db/` (so they could live in a crate of their own, as the
/// Python SDK lives beside them).
#[test]
fn the_wire_side_never_imports_the_server() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for part in ["protocol", "worker", "bus", "domain", "client.rs"] {
        walk(&root.join(part), &mut files);
    }
    assert!(files.len() > 20, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for server in ["crate::service", "crate::db"] {
            assert!(
                !text.contains(server),
                "{} uses {server}: the wire side must not depend on the server",
                file.display()
            );
        }
    }
}

/// The use-cases hold no SQL: every statement lives in `db/`, one module per aggregate.
#[test]
fn the_services_hold_no_sql() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root.join("service"), &mut files);
    assert!(files.len() > 5, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for sql in ["sqlx::query", "query_as", "query_scalar", "raw_sql"] {
            assert!(
                !text.contains(sql),
                "{} runs SQL ({sql}): statements belong in db/",
                file.display()
            );
        }
    }
}

#[test]
fn the_openapi_document_lists_every_route_of_the_router() {
    let doc: serde_json::Value = serde_json::from_str(omoi::api::OPENAPI_JSON).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    let mut routes = 0;
    for file in [
        "agents.rs",
        "workflows.rs",
        "collaboration.rs",
        "tokens.rs",
        "ws.rs",
    ] {
        let src = std::fs::read_to_string(format!("{}/src/api/{file}", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
        // Every `.route("<path>", …)`, however rustfmt wrapped it.
        for call in src.split(".route(").skip(1) {
            let path = call.split('"').nth(1).unwrap();
            routes += 1;
            assert!(
                paths.contains_key(&format!("/api/v1{path}")),
                "{path} is not in docs/openapi.json"
            );
        }
    }
    assert_eq!(
        routes,
        paths.len(),
        "docs/openapi.json lists a path the router does not serve"
    );
}

#[test]
fn every_route_has_an_access_rule_and_every_rule_a_route() {
    let doc: serde_json::Value = serde_json::from_str(omoi::api::OPENAPI_JSON).unwrap();
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let route = path.strip_prefix("/api/v1").unwrap_or(path).to_string();
            documented.push((method.to_uppercase(), route));
        }
    }
    for (method, route) in &documented {
        assert!(
            omoi::domain::access::ROUTES
                .iter()
                .any(|(m, p, _)| m == method && p == route),
            "{method} {route} has no access rule (it would be admin-only)"
        );
    }
    for (m, p, _) in omoi::domain::access::ROUTES {
        assert!(
            // Served outside the documented paths: /metrics and this document itself.
            ["/metrics", "/openapi.json"].contains(p)
                || documented.iter().any(|(dm, dp)| dm == m && dp == p),
            "the access rule for {m} {p} names no route"
        );
    }
}

/// Where the Dockerfile's build stage puts what it copies: each source path of a `COPY`
/// (without `--from`) before the first runtime stage.
fn docker_build_copies(dockerfile: &str) -> Vec<String> {
    let mut copied = Vec::new();
    let mut stages = 0;
    for line in dockerfile.lines().map(str::trim) {
        if line.starts_with("FROM ") {
            stages += 1;
        }
        if stages == 1 && line.starts_with("COPY ") && !line.contains("--from") {
            let words: Vec<&str> = line.split_whitespace().skip(1).collect();
            let (_, sources) = words.split_last().expect("COPY <src>… <dest>");
            copied.extend(sources.iter().map(|s| s.trim_end_matches('/').to_string()));
        }
    }
    copied
}

/// Every file the build reads besides `src/`: the manifest, the build script, `include_str!`/
/// `include_bytes!` arguments (relative to their source file) and `sqlx::migrate!` directories,
/// as repository paths.
fn files_the_build_reads(root: &std::path::Path) -> Vec<String> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut sources = Vec::new();
    walk(&root.join("src"), &mut sources);
    let mut read = vec!["Cargo.toml".to_string(), "Cargo.lock".to_string()];
    if root.join("build.rs").exists() {
        read.push("build.rs".to_string());
    }
    for file in sources {
        let text = std::fs::read_to_string(&file).unwrap();
        for (macro_name, relative_to_file) in [
            ("include_str!(\"", true),
            ("include_bytes!(\"", true),
            ("migrate!(\"", false),
        ] {
            for (at, _) in text.match_indices(macro_name) {
                let rest = &text[at + macro_name.len()..];
                let arg = &rest[..rest.find('"').unwrap()];
                let base = if relative_to_file {
                    file.parent().unwrap().to_path_buf()
                } else {
                    root.to_path_buf()
                };
                let path = std::fs::canonicalize(base.join(arg)).unwrap();
                let repo_path = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                read.push(repo_path);
            }
        }
    }
    read
}

#[test]
fn the_docker_image_builds_from_what_it_copies_runs_unprivileged_and_compose_sits_beside_local_servers()
 {
    let root = std::fs::canonicalize(env!("CARGO_MANIFEST_DIR")).unwrap();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let copied = docker_build_copies(&dockerfile);
    assert!(copied.contains(&"src".to_string()), "{copied:?}");
    let read = files_the_build_reads(&root);
    assert!(
        read.iter().any(|p| p == "docs/openapi.json"),
        "the scan finds the embedded files: {read:?}"
    );
    for path in &read {
        assert!(
            copied
                .iter()
                .any(|c| path == c || path.starts_with(&format!("{c}/"))),
            "the build reads {path}, which the Dockerfile does not copy ({copied:?})"
        );
    }
    // Multi-stage, and the runtime stage runs as a user without privileges.
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    assert!(dockerfile.matches("\nFROM ").count() >= 1, "multi-stage");
    let user = runtime
        .lines()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .expect("a USER in the runtime stage");
    assert!(!["root", "0"].contains(&user.trim()), "{user}");

    let compose: Value =
        serde_norway::from_str(&std::fs::read_to_string(root.join("docker-compose.yml")).unwrap())
            .unwrap();
    for (name, service) in compose["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        assert!(
            service.get("healthcheck").is_some(),
            "service {name} has no healthcheck"
        );
        // Host ports are set by variables, so the stack runs beside a local NATS and
        // PostgreSQL; their defaults are not the local servers' ports.
        for port in service
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let port = port.as_str().unwrap();
            assert!(port.contains("${OMOI_"), "{name}: {port} is fixed");
            for taken in [":-4222}", ":-5432}"] {
                assert!(!port.contains(taken), "{name}: {port} collides by default");
            }
        }
    }
}
