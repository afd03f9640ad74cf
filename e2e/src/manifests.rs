//! Applying YAML to a cluster the way `kubectl apply --server-side` does: multi-document
//! YAML parsed with serde-saphyr, each object's kind resolved by discovery, server-side
//! apply (optionally as a dry run), and the edgeloom CRDs installed and awaited.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use kube::runtime::wait::{await_condition, conditions};
use std::time::Duration;

/// Field manager of objects the harness applies.
pub const FIELD_MANAGER: &str = "edgeloom-e2e";

/// Errors while applying manifests.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The YAML does not parse.
    #[error("parsing YAML: {0}")]
    Parse(String),
    /// An object lacks apiVersion/kind/name.
    #[error("object #{index} has no {what}")]
    Incomplete {
        /// Position in the file.
        index: usize,
        /// What is missing.
        what: &'static str,
    },
    /// The API server refused or failed.
    #[error("{kind} {name}: {}", server_message(source))]
    Api {
        /// Kind of the object.
        kind: String,
        /// Name of the object.
        name: String,
        /// The error, with the server's message.
        source: kube::Error,
    },
    /// A CRD never became Established.
    #[error("CRD {0} was not Established within 60s")]
    NotEstablished(String),
}

/// The API server's own message for an API error (what kubectl prints), else the error.
pub fn server_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

/// Parses every YAML document of `text` into an object (empty documents are skipped).
pub fn parse(text: &str) -> Result<Vec<DynamicObject>, ManifestError> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| ManifestError::Parse(e.to_string()))?;
    let mut objects = Vec::new();
    for (index, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let obj: DynamicObject =
            serde_json::from_value(doc).map_err(|e| ManifestError::Parse(e.to_string()))?;
        if obj.types.is_none() {
            return Err(ManifestError::Incomplete {
                index,
                what: "apiVersion/kind",
            });
        }
        if obj.metadata.name.is_none() {
            return Err(ManifestError::Incomplete {
                index,
                what: "metadata.name",
            });
        }
        objects.push(obj);
    }
    Ok(objects)
}

/// The typed API for `obj`'s kind, in `namespace` when the kind is namespaced and the
/// object names none.
async fn api_for(
    client: &kube::Client,
    obj: &DynamicObject,
    namespace: &str,
) -> Result<Api<DynamicObject>, ManifestError> {
    let types = obj.types.clone().unwrap_or_default();
    let name = obj.metadata.name.clone().unwrap_or_default();
    let gvk = GroupVersionKind::try_from(&types)
        .map_err(|e| ManifestError::Parse(format!("{} {name}: {e}", types.kind)))?;
    let (resource, caps) = discovery::pinned_kind(client, &gvk)
        .await
        .map_err(|source| ManifestError::Api {
            kind: types.kind.clone(),
            name: name.clone(),
            source,
        })?;
    Ok(if caps.scope == Scope::Namespaced {
        let ns = obj.metadata.namespace.as_deref().unwrap_or(namespace);
        Api::namespaced_with(client.clone(), ns, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    })
}

fn api_error(obj: &DynamicObject) -> impl FnOnce(kube::Error) -> ManifestError {
    let kind = obj
        .types
        .as_ref()
        .map(|t| t.kind.clone())
        .unwrap_or_default();
    let name = obj.metadata.name.clone().unwrap_or_default();
    move |source| ManifestError::Api { kind, name, source }
}

/// Creates `obj` the way `kubectl create` does (a POST); with `dry_run` the server
/// validates and admits but stores nothing.
pub async fn create(
    client: &kube::Client,
    obj: &DynamicObject,
    namespace: &str,
    dry_run: bool,
) -> Result<DynamicObject, ManifestError> {
    let api = api_for(client, obj, namespace).await?;
    let params = PostParams {
        dry_run,
        field_manager: Some(FIELD_MANAGER.into()),
    };
    api.create(&params, obj).await.map_err(api_error(obj))
}

/// Server-side applies `obj` (into `namespace` when the kind is namespaced and the object
/// names none). With `dry_run` the server validates and admits but stores nothing.
pub async fn apply(
    client: &kube::Client,
    obj: &DynamicObject,
    namespace: &str,
    dry_run: bool,
) -> Result<DynamicObject, ManifestError> {
    let api = api_for(client, obj, namespace).await?;
    let name = obj.metadata.name.clone().unwrap_or_default();
    let mut params = PatchParams::apply(FIELD_MANAGER).force();
    params.dry_run = dry_run;
    api.patch(&name, &params, &Patch::Apply(obj))
        .await
        .map_err(api_error(obj))
}

/// Applies every object of `text`, in order.
pub async fn apply_all(
    client: &kube::Client,
    text: &str,
    namespace: &str,
    dry_run: bool,
) -> Result<Vec<DynamicObject>, ManifestError> {
    let mut applied = Vec::new();
    for obj in parse(text)? {
        applied.push(apply(client, &obj, namespace, dry_run).await?);
    }
    Ok(applied)
}

/// Installs (server-side applies) the edgeloom CRDs and waits until each is Established.
pub async fn install_crds(client: &kube::Client) -> Result<(), ManifestError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for crd in edgeloom_crds::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .map_err(|source| ManifestError::Api {
                kind: "CustomResourceDefinition".into(),
                name: name.clone(),
                source,
            })?;
    }
    for crd in edgeloom_crds::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        match tokio::time::timeout(Duration::from_secs(60), established).await {
            Ok(Ok(_)) => {}
            _ => return Err(ManifestError::NotEstablished(name)),
        }
    }
    Ok(())
}
