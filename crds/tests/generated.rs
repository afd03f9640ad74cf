//! The generated CRD YAML must match what the Rust types generate, and the examples in
//! manifests/ must deserialize into the Rust types.

use edgeloom_crds::{ComputeJob, ComputeTask, EdgePool, GENERATED_DIRS, generated_files};
use std::path::Path;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn generated_crds_are_up_to_date() {
    let files = generated_files().expect("CRDs serialise");
    assert_eq!(files.len(), 3);
    let mut stale = Vec::new();
    for dir in GENERATED_DIRS {
        for (name, yaml) in &files {
            let path = repo().join(dir).join(name);
            match std::fs::read_to_string(&path) {
                Ok(on_disk) if &on_disk == yaml => {}
                Ok(_) => stale.push(format!("{} differs", path.display())),
                Err(e) => stale.push(format!("{}: {e}", path.display())),
            }
        }
        let yaml_count = std::fs::read_dir(repo().join(dir))
            .expect("generated dir exists")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "yaml"))
            })
            .count();
        if yaml_count != files.len() {
            stale.push(format!(
                "{dir} holds {yaml_count} YAML files, expected {}",
                files.len()
            ));
        }
    }
    assert!(
        stale.is_empty(),
        "generated CRDs are stale; run `cargo xtask crdgen`:\n{}",
        stale.join("\n")
    );
}

#[test]
fn crds_carry_names_columns_and_validation() {
    for crd in edgeloom_crds::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let names = &crd.spec.names;
        assert_eq!(
            names.categories.as_deref(),
            Some(&["edgeloom".to_string()][..]),
            "{name}"
        );
        let short = names.short_names.clone().unwrap_or_default();
        assert!(!short.is_empty(), "{name} has a short name");
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some()),
            "{name} has a status subresource"
        );
        assert!(
            version
                .additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 5),
            "{name} has printer columns"
        );
        let schema = serde_json::to_string(&version.schema).expect("schema serialises");
        assert!(
            schema.contains("x-kubernetes-validations"),
            "{name} has CEL rules"
        );
    }
}

/// Every example must be a valid object of the Rust types (the API server checks the
/// schema in the e2e tests; this checks that operator and agent can read them).
#[test]
fn examples_deserialize_into_the_api_types() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("manifests")).expect("manifests/ exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        let value: serde_json::Value = serde_saphyr::from_str(&text).expect("valid YAML");
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        let result = match kind.as_str() {
            "ComputeJob" => serde_json::from_value::<ComputeJob>(value).map(|_| ()),
            "EdgePool" => serde_json::from_value::<EdgePool>(value).map(|_| ()),
            "ComputeTask" => serde_json::from_value::<ComputeTask>(value).map(|_| ()),
            other => panic!("{}: unexpected kind {other}", path.display()),
        };
        result.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen += 1;
    }
    assert!(seen >= 6, "expected the examples, found {seen}");
}
