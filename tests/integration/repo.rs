//! Files of the repository that no other test exercises: docker-compose.yml and the Dockerfile.

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
