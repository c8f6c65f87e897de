//! The Kubernetes manifests in `k8s/` (the base, each overlay, the GPU
//! component), checked offline.
//!
//! - Every rendered object is validated against the JSON Schema of its kind:
//!   `k8s/schemas/kubernetes-v1.32-strict.json` (the Kubernetes API definitions,
//!   unknown fields refused) and `k8s/schemas/crds.json` (KEDA and the Prometheus
//!   Operator, written by hand).
//! - Then Sluice's own rules, against the configuration each pod will really
//!   load (default.toml, then the ConfigMap's sluice.toml, then the container's
//!   `SLUICE_*` variables): probes, grace period above the drain timeout, the
//!   security context, secrets only through `secretKeyRef`, KEDA triggers on the
//!   consumer groups and topics Sluice uses with no more replicas than
//!   partitions, a PodDisruptionBudget, a Service and NetworkPolicy coverage for
//!   every stage, the GPU variant, and the Prometheus Operator's copy of the
//!   alerting rules.
//! - Every rule is shown to fail on a manifest broken on purpose.
//!
//! kustomize is not needed: `render` implements the part of it these files use
//! (resources, components, `configMapGenerator` without the name hash, JSON 6902
//! patches, images, namespace) and refuses any other field, so that a
//! kustomization never uses a feature this test would silently skip. One test
//! also compares the renders with `kubectl kustomize` (the kubectl that
//! `make setup` installs, found through `KUBECTL`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use clap::ValueEnum;
use serde_json::{Value, json};
use sluice_app::config::SluiceConfig;
use sluice_app::launch::StageKind;
use sluice_model::DeviceChoice;

#[allow(dead_code, reason = "the Compose and alert checks use the rest")]
mod deployment;
use deployment::{STAGES, assert_no_errors, listen_port, read_one_yaml, read_yaml, repo_root, unset, yaml_documents};

/// The overlays, and whether each runs the inferrer on a GPU.
const OVERLAYS: [(&str, bool); 2] = [("dev", false), ("prod", true)];
/// Environment variables whose value is a credential, whatever their content.
const SECRET_VARIABLES: [&str; 2] = ["SLUICE_POSTGRES__DSN", "SLUICE_CONTROL__REDIS_URL"];
/// Parts of a variable or property name that mark a credential.
const SECRET_WORDS: [&str; 5] = ["password", "secret", "token", "credential", "private"];

fn k8s_dir() -> PathBuf {
    repo_root().join("k8s")
}

// ---------------------------------------------------------------------------
// The part of kustomize these manifests use

/// Renders the kustomization in `dir` (a folder of `k8s/`) as kustomize would,
/// without the configMapGenerator's name hash. `files` collects every file read.
fn render(dir: &Path, files: &mut BTreeSet<PathBuf>) -> Result<Vec<Value>, String> {
    let kustomization = read_kustomization(dir, "Kustomization", files)?;
    let mut objects = Vec::new();
    add_resources(dir, &kustomization, &mut objects, files)?;
    for component in string_list(&kustomization, "components")? {
        apply_component(&dir.join(component), &mut objects, files)?;
    }
    transform(dir, &kustomization, &mut objects, files)?;
    let mut seen = BTreeSet::new();
    for object in &objects {
        let id = object_id(object);
        if !seen.insert(id.clone()) {
            return Err(format!("{}: {id} is defined twice", dir.display()));
        }
    }
    Ok(objects)
}

fn read_kustomization(dir: &Path, kind: &str, files: &mut BTreeSet<PathBuf>) -> Result<Value, String> {
    let path = dir.join("kustomization.yaml");
    if !path.is_file() {
        return Err(format!("{} does not exist", path.display()));
    }
    files.insert(canonical(&path));
    let mut documents = read_yaml(&path)?;
    if documents.len() != 1 {
        return Err(format!("{}: one document expected", path.display()));
    }
    let k = documents.remove(0);
    let expected_api =
        if kind == "Component" { "kustomize.config.k8s.io/v1alpha1" } else { "kustomize.config.k8s.io/v1beta1" };
    if k["kind"] != kind || k["apiVersion"] != expected_api {
        return Err(format!("{}: expected {expected_api} {kind}", path.display()));
    }
    let supported =
        ["apiVersion", "kind", "resources", "components", "configMapGenerator", "patches", "images", "namespace"];
    for field in k.as_object().map(|m| m.keys().collect::<Vec<_>>()).unwrap_or_default() {
        if !supported.contains(&field.as_str()) {
            return Err(format!(
                "{}: `{field}` is not rendered by tests/k8s.rs; use one of {supported:?} or teach the test",
                path.display()
            ));
        }
    }
    Ok(k)
}

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

fn string_list(k: &Value, field: &str) -> Result<Vec<String>, String> {
    match &k[field] {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or_else(|| format!("`{field}` holds a non-string")))
            .collect(),
        _ => Err(format!("`{field}` must be a list")),
    }
}

fn add_resources(dir: &Path, k: &Value, objects: &mut Vec<Value>, files: &mut BTreeSet<PathBuf>) -> Result<(), String> {
    for entry in string_list(k, "resources")? {
        let path = dir.join(&entry);
        if path.is_dir() {
            objects.extend(render(&path, files)?);
        } else if path.is_file() {
            files.insert(canonical(&path));
            objects.extend(read_yaml(&path)?);
        } else {
            return Err(format!("{}: resource `{entry}` does not exist", dir.display()));
        }
    }
    Ok(())
}

/// A kustomize Component: its resources join the parent's, then its generators
/// and patches apply to all of them (before the parent's own).
fn apply_component(dir: &Path, objects: &mut Vec<Value>, files: &mut BTreeSet<PathBuf>) -> Result<(), String> {
    let k = read_kustomization(dir, "Component", files)?;
    if !k["namespace"].is_null() {
        return Err(format!("{}: a component sets no namespace", dir.display()));
    }
    add_resources(dir, &k, objects, files)?;
    for component in string_list(&k, "components")? {
        apply_component(&dir.join(component), objects, files)?;
    }
    transform(dir, &k, objects, files)
}

fn transform(dir: &Path, k: &Value, objects: &mut Vec<Value>, files: &mut BTreeSet<PathBuf>) -> Result<(), String> {
    generate_config_maps(dir, k, objects, files)?;
    apply_patches(dir, k, objects, files)?;
    set_images(k, objects)?;
    if let Some(namespace) = k["namespace"].as_str() {
        for object in objects.iter_mut() {
            // Namespaces are cluster-scoped; every other kind here is namespaced.
            if object["kind"] != "Namespace" {
                object["metadata"]["namespace"] = json!(namespace);
            }
        }
    }
    Ok(())
}

fn generate_config_maps(
    dir: &Path,
    k: &Value,
    objects: &mut Vec<Value>,
    files: &mut BTreeSet<PathBuf>,
) -> Result<(), String> {
    for generator in k["configMapGenerator"].as_array().into_iter().flatten() {
        for field in generator.as_object().map(|m| m.keys().collect::<Vec<_>>()).unwrap_or_default() {
            if !["name", "files", "behavior"].contains(&field.as_str()) {
                return Err(format!("{}: configMapGenerator `{field}` is not rendered here", dir.display()));
            }
        }
        let name = generator["name"].as_str().ok_or("configMapGenerator without a name")?;
        let mut data = serde_json::Map::new();
        for entry in string_list(generator, "files")? {
            let (key, file) = entry.split_once('=').unwrap_or_else(|| {
                let key = Path::new(&entry).file_name().and_then(|n| n.to_str()).unwrap_or(&entry);
                (key, entry.as_str())
            });
            let path = dir.join(file);
            files.insert(canonical(&path));
            let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            data.insert(key.to_string(), json!(text));
        }
        let existing = objects.iter().position(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == name);
        match (generator["behavior"].as_str().unwrap_or("create"), existing) {
            ("create", None) => objects.push(json!({
                "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data,
            })),
            ("replace", Some(i)) => objects[i]["data"] = Value::Object(data),
            ("merge", Some(i)) => {
                for (key, value) in data {
                    objects[i]["data"][key] = value;
                }
            }
            (behavior, _) => return Err(format!("{}: configMapGenerator {name}: {behavior} fails", dir.display())),
        }
    }
    Ok(())
}

/// JSON 6902 patches (a list of operations) with a target; strategic-merge
/// patches are refused, to keep the renderer small and exact.
fn apply_patches(dir: &Path, k: &Value, objects: &mut [Value], files: &mut BTreeSet<PathBuf>) -> Result<(), String> {
    for patch in k["patches"].as_array().into_iter().flatten() {
        let ops = match (patch["path"].as_str(), patch["patch"].as_str()) {
            (Some(file), None) => {
                let path = dir.join(file);
                files.insert(canonical(&path));
                read_yaml(&path)?
            }
            (None, Some(inline)) => yaml_documents(inline)?,
            _ => return Err(format!("{}: a patch needs `path` or `patch`", dir.display())),
        };
        let ops = match ops.as_slice() {
            [Value::Array(ops)] => ops.clone(),
            _ => {
                return Err(format!("{}: {patch}: only JSON 6902 patches (a list of ops) are rendered", dir.display()));
            }
        };
        let target = &patch["target"];
        for field in target.as_object().map(|m| m.keys().collect::<Vec<_>>()).unwrap_or_default() {
            if !["group", "version", "kind", "name"].contains(&field.as_str()) {
                return Err(format!("{}: patch target `{field}` is not rendered here", dir.display()));
            }
        }
        let mut matched = 0;
        for object in objects.iter_mut() {
            if target_matches(target, object) {
                matched += 1;
                json_patch(object, &ops)
                    .map_err(|e| format!("{}: {} on {}: {e}", dir.display(), patch, object_id(object)))?;
            }
        }
        if matched == 0 {
            return Err(format!("{}: patch {patch} matches no object", dir.display()));
        }
    }
    Ok(())
}

fn target_matches(target: &Value, object: &Value) -> bool {
    let api = object["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api.rsplit_once('/').unwrap_or(("", api));
    let field = |name: &str, actual: &str| target[name].as_str().is_none_or(|wanted| wanted == actual);
    target.is_object()
        && field("group", group)
        && field("version", version)
        && field("kind", object["kind"].as_str().unwrap_or_default())
        && field("name", object["metadata"]["name"].as_str().unwrap_or_default())
}

/// RFC 6902 `add`, `remove`, `replace` and `test`.
fn json_patch(document: &mut Value, ops: &[Value]) -> Result<(), String> {
    for op in ops {
        let path = op["path"].as_str().ok_or("an op without a path")?;
        let value = op.get("value").cloned();
        match op["op"].as_str() {
            Some("test") => {
                if document.pointer(path) != value.as_ref() {
                    return Err(format!("test failed: {path} is not {}", value.unwrap_or_default()));
                }
            }
            Some("replace") => {
                let slot = document.pointer_mut(path).ok_or_else(|| format!("replace: {path} does not exist"))?;
                *slot = value.ok_or("replace without a value")?;
            }
            Some(kind @ ("add" | "remove")) => {
                let (parent, last) = path.rsplit_once('/').ok_or_else(|| format!("bad path {path}"))?;
                let last = last.replace("~1", "/").replace("~0", "~");
                let parent = document
                    .pointer_mut(parent)
                    .ok_or_else(|| format!("{kind}: the parent of {path} does not exist"))?;
                match (kind, parent) {
                    ("add", Value::Object(map)) => {
                        map.insert(last, value.ok_or("add without a value")?);
                    }
                    ("add", Value::Array(items)) => {
                        let value = value.ok_or("add without a value")?;
                        match last.as_str() {
                            "-" => items.push(value),
                            i => {
                                let i: usize = i.parse().map_err(|_| format!("bad index in {path}"))?;
                                if i > items.len() {
                                    return Err(format!("add: index out of range in {path}"));
                                }
                                items.insert(i, value);
                            }
                        }
                    }
                    ("remove", Value::Object(map)) => {
                        map.remove(&last).ok_or_else(|| format!("remove: {path} does not exist"))?;
                    }
                    ("remove", Value::Array(items)) => {
                        let i: usize = last.parse().map_err(|_| format!("bad index in {path}"))?;
                        if i >= items.len() {
                            return Err(format!("remove: {path} does not exist"));
                        }
                        items.remove(i);
                    }
                    _ => return Err(format!("{kind}: the parent of {path} is not a container")),
                }
            }
            other => return Err(format!("op {other:?} is not rendered here")),
        }
    }
    Ok(())
}

/// kustomize's `images`: a new name, tag or digest for each matching image.
fn set_images(k: &Value, objects: &mut [Value]) -> Result<(), String> {
    for image in k["images"].as_array().into_iter().flatten() {
        let name = image["name"].as_str().ok_or("an image entry without a name")?;
        for object in objects.iter_mut() {
            for list in ["containers", "initContainers"] {
                let containers =
                    object.pointer_mut(&format!("/spec/template/spec/{list}")).and_then(Value::as_array_mut);
                for container in containers.into_iter().flatten() {
                    let reference = ImageRef::parse(container["image"].as_str().unwrap_or_default());
                    if reference.name != name {
                        continue;
                    }
                    let new = ImageRef {
                        name: image["newName"].as_str().unwrap_or(&reference.name).to_string(),
                        tag: image["newTag"].as_str().map(str::to_string).or(reference.tag),
                        digest: image["digest"].as_str().map(str::to_string).or(reference.digest),
                    };
                    container["image"] = json!(new.to_string());
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug)]
struct ImageRef {
    name: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageRef {
    fn parse(image: &str) -> Self {
        let (rest, digest) = match image.split_once('@') {
            Some((rest, digest)) => (rest, Some(digest.to_string())),
            None => (image, None),
        };
        // A ':' after the last '/' starts the tag (one before it is a registry port).
        let slash = rest.rfind('/').map_or(0, |i| i + 1);
        match rest[slash..].split_once(':') {
            Some((name, tag)) => Self { name: format!("{}{name}", &rest[..slash]), tag: Some(tag.to_string()), digest },
            None => Self { name: rest.to_string(), tag: None, digest },
        }
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn object_id(object: &Value) -> String {
    format!("{} {}", object["kind"].as_str().unwrap_or("?"), object["metadata"]["name"].as_str().unwrap_or("?"))
}

fn rendered(what: &str) -> Vec<Value> {
    let dir = match what {
        "base" => k8s_dir().join("base"),
        overlay => k8s_dir().join("overlays").join(overlay),
    };
    render(&dir, &mut BTreeSet::new()).unwrap_or_else(|e| panic!("rendering k8s/{what}: {e}"))
}

// ---------------------------------------------------------------------------
// Schemas

/// A validator per `apiVersion/kind`, from the two vendored schema files.
static SCHEMAS: LazyLock<BTreeMap<String, jsonschema::Validator>> = LazyLock::new(|| {
    let dir = k8s_dir().join("schemas");
    let files = ["kubernetes-v1.32-strict.json", "crds.json"].map(|name| {
        let text = fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("k8s/schemas/{name}: {e}"));
        serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("k8s/schemas/{name}: {e}"))
    });
    let mut defs = serde_json::Map::new();
    let mut kinds = BTreeMap::new();
    for file in &files {
        defs.extend(file["$defs"].as_object().expect("$defs").clone());
        for (kind, def) in file["kinds"].as_object().expect("kinds") {
            kinds.insert(kind.clone(), def.as_str().expect("a definition name").to_string());
        }
    }
    kinds
        .into_iter()
        .map(|(kind, def)| {
            let schema = json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$defs": defs,
                "$ref": format!("#/$defs/{def}"),
            });
            let validator = jsonschema::draft202012::options()
                .build(&schema)
                .unwrap_or_else(|e| panic!("the schema of {kind} does not compile: {e}"));
            (kind, validator)
        })
        .collect()
});

/// Schema errors of every object: unknown kinds, missing names, and whatever
/// the kind's schema refuses.
fn schema_errors(objects: &[Value]) -> Vec<String> {
    let mut errors = Vec::new();
    for object in objects {
        let id = object_id(object);
        let kind = format!(
            "{}/{}",
            object["apiVersion"].as_str().unwrap_or_default(),
            object["kind"].as_str().unwrap_or_default()
        );
        if object["metadata"]["name"].as_str().is_none_or(str::is_empty) {
            errors.push(format!("{id}: metadata.name is missing"));
        }
        let Some(validator) = SCHEMAS.get(&kind) else {
            errors.push(format!("{id}: no schema for {kind} in k8s/schemas"));
            continue;
        };
        for error in validator.iter_errors(object) {
            errors.push(format!("{id}: {error} (at {})", error.instance_path()));
        }
    }
    errors
}

// ---------------------------------------------------------------------------
// Sluice's configuration, as a pod will load it

/// `{"a.b"="x", c="y"}` (values without `,` or `}`), as figment parses a table.
fn figment_table(raw: &str) -> Option<BTreeMap<String, String>> {
    let inner = raw.trim().strip_prefix('{')?.strip_suffix('}')?;
    let mut table = BTreeMap::new();
    for pair in inner.split(',').filter(|p| !p.trim().is_empty()) {
        let (key, value) = pair.split_once('=')?;
        table.insert(key.trim().trim_matches('"').to_string(), value.trim().trim_matches('"').to_string());
    }
    Some(table)
}

/// The first container of a Deployment (the Sluice one; the check for the
/// stages makes sure there is exactly one).
fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn env_list(container: &Value) -> Vec<&Value> {
    container["env"].as_array().map(|e| e.iter().collect()).unwrap_or_default()
}

/// The ConfigMap key that `SLUICE_CONFIG` names, through the container's mounts.
fn mounted_config<'a>(objects: &'a [Value], deployment: &'a Value) -> Result<(String, &'a str), String> {
    let c = container(deployment);
    let id = object_id(deployment);
    let path = env_list(c)
        .into_iter()
        .find(|e| e["name"] == "SLUICE_CONFIG")
        .and_then(|e| e["value"].as_str())
        .ok_or_else(|| format!("{id}: SLUICE_CONFIG is not set"))?;
    for mount in c["volumeMounts"].as_array().into_iter().flatten() {
        let mount_path = mount["mountPath"].as_str().unwrap_or_default();
        let key = match mount["subPath"].as_str() {
            Some(sub) if mount_path == path => sub.to_string(),
            None => match Path::new(path).strip_prefix(mount_path) {
                Ok(rest) if rest.components().count() == 1 => rest.to_string_lossy().into_owned(),
                _ => continue,
            },
            _ => continue,
        };
        let volume = deployment["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == mount["name"])
            .ok_or_else(|| format!("{id}: volume {} is not defined", mount["name"]))?;
        let name = volume["configMap"]["name"]
            .as_str()
            .ok_or_else(|| format!("{id}: SLUICE_CONFIG ({path}) is not on a ConfigMap volume"))?;
        let config_map = objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == name)
            .ok_or_else(|| format!("{id}: ConfigMap {name} (SLUICE_CONFIG) is not in the manifests"))?;
        let text = config_map["data"][&key]
            .as_str()
            .ok_or_else(|| format!("{id}: ConfigMap {name} has no key {key} (SLUICE_CONFIG={path})"))?;
        return Ok((format!("ConfigMap {name} {key}"), text));
    }
    Err(format!("{id}: SLUICE_CONFIG={path} is not inside a mounted volume"))
}

/// What the pod's `sluice` loads: default.toml, then the mounted sluice.toml,
/// then the container's `SLUICE_<SECTION>__<KEY>` variables (a `secretKeyRef`
/// reads as `<secret>`), through Sluice's own loader, so an unknown key or a
/// value of the wrong type is refused here as it would be at start.
fn effective_config(objects: &[Value], deployment: &Value) -> Result<SluiceConfig, Vec<String>> {
    let (file, text) = mounted_config(objects, deployment).map_err(|e| vec![e])?;
    let variables: Vec<(String, String)> = env_list(container(deployment))
        .into_iter()
        .map(|var| {
            // What Kubernetes puts there: a pod's name (`sluice-fetcher-` and a
            // hash), or a Secret's value.
            let value = match (var["value"].as_str(), var["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
                (Some(value), _) => value.to_string(),
                (None, Some("metadata.name")) => {
                    format!("{}-7d9f8b6c5-x2x7q", deployment["metadata"]["name"].as_str().unwrap_or("pod"))
                }
                (None, _) => secret_placeholder(var["name"].as_str().unwrap_or_default()).to_string(),
            };
            (var["name"].as_str().unwrap_or_default().to_string(), value)
        })
        .collect();
    let id = object_id(deployment);
    SluiceConfig::from_text(text, &variables)
        .map_err(|errors| errors.iter().map(|e| format!("{id} ({file} and its environment): {e}")).collect())
}

/// A value of the form a Secret holds for `variable`, so that the loader
/// checks the rest of the configuration as it would in the cluster.
fn secret_placeholder(variable: &str) -> &'static str {
    match variable {
        "SLUICE_CONTROL__REDIS_URL" => "rediss://:secret@redis.example:6379",
        "SLUICE_POSTGRES__DSN" => "host=postgres.example user=sluice password=secret dbname=sluice",
        _ => "<secret>",
    }
}

/// The (consumer group, input topic) pairs of `sluice run <stage>`, as Sluice forms them.
fn consumers(stage: &str, config: &SluiceConfig) -> BTreeSet<(String, String)> {
    let Ok(kind) = StageKind::from_str(stage, true) else { return BTreeSet::new() };
    StageKind::expand(&[kind], config)
        .into_iter()
        .map(|k| (k.group_id(&config.kafka), k.input_topic(config).to_string()))
        .collect()
}

// ---------------------------------------------------------------------------
// Sluice's rules

/// What an environment must look like besides the rules every render follows.
#[derive(Debug, Clone)]
struct Expect {
    /// The inferrer runs on a GPU (components/gpu).
    gpu: bool,
    /// Every object is in this namespace, which the render also creates.
    namespace: Option<&'static str>,
    /// Images carry a tag other than `latest` (the base leaves tags to overlays).
    pinned_images: bool,
}

fn expect(what: &str) -> Expect {
    match what {
        "base" => Expect { gpu: false, namespace: None, pinned_images: false },
        "dev" => Expect { gpu: false, namespace: Some("sluice-dev"), pinned_images: true },
        "prod" => Expect { gpu: true, namespace: Some("sluice"), pinned_images: true },
        other => panic!("unknown render {other}"),
    }
}

fn of_kind<'a>(objects: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objects.iter().filter(move |o| o["kind"] == kind)
}

fn pod_labels(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["metadata"]["labels"]
}

/// Whether `matchLabels` (a non-empty map) selects `labels`.
fn selects(match_labels: &Value, labels: &Value) -> bool {
    match_labels.as_object().is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| &labels[k] == v))
}

/// The Deployment of each stage: the one whose container runs `sluice run <stage>`.
fn stage_deployments(objects: &[Value]) -> Vec<(&'static str, &Value)> {
    STAGES
        .iter()
        .filter_map(|stage| {
            of_kind(objects, "Deployment").find(|d| container(d)["args"] == json!(["run", stage])).map(|d| (*stage, d))
        })
        .collect()
}

/// Resolves a probe's or Service's port (a number or a container port name) to a number.
fn resolve_port(container: &Value, port: &Value) -> Option<i64> {
    match port {
        Value::Number(n) => n.as_i64(),
        Value::String(name) => container["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_i64()),
        _ => None,
    }
}

/// Every rule; an empty list means the render is fine.
fn check_all(objects: &[Value], expect: &Expect) -> Vec<String> {
    let mut errors = Vec::new();
    errors.extend(check_stages(objects));
    for (stage, deployment) in stage_deployments(objects) {
        match effective_config(objects, deployment) {
            Ok(config) => {
                errors.extend(check_deployment(deployment, &config));
                errors.extend(check_scaling(objects, stage, deployment, &config));
                errors.extend(check_disruption_and_service(objects, stage, deployment, &config));
                errors.extend(check_network_policy(objects, deployment, &config));
                errors.extend(check_gpu(stage, deployment, &config, expect.gpu));
            }
            Err(config_errors) => errors.extend(config_errors),
        }
        errors.extend(check_secrets(deployment));
        errors.extend(check_image(deployment, expect));
    }
    errors.extend(check_scaled_object_targets(objects));
    errors.extend(check_no_secret_material(objects));
    errors.extend(check_namespace(objects, expect));
    // A shared object (the ConfigMap, the NetworkPolicy) is checked once per stage.
    let mut seen = BTreeSet::new();
    errors.retain(|e| seen.insert(e.clone()));
    errors
}

/// One Deployment per stage, running `sluice run <stage>` in a single container.
fn check_stages(objects: &[Value]) -> Vec<String> {
    let mut errors = Vec::new();
    for stage in STAGES {
        let found: Vec<_> =
            of_kind(objects, "Deployment").filter(|d| container(d)["args"] == json!(["run", stage])).collect();
        if found.len() != 1 {
            errors.push(format!("stage {stage}: {} Deployments run `sluice run {stage}`, one expected", found.len()));
        }
    }
    for deployment in of_kind(objects, "Deployment") {
        let containers = deployment["spec"]["template"]["spec"]["containers"].as_array().map_or(0, Vec::len);
        if containers != 1 {
            errors
                .push(format!("{}: {containers} containers; a stage's pod runs `sluice` alone", object_id(deployment)));
        }
    }
    errors
}

/// A stage's pod: the probes on observe.listen, the grace period above the drain
/// timeout, the security context, resources, the DSN where PostgreSQL is used,
/// and no `replicas` (KEDA owns it).
fn check_deployment(deployment: &Value, config: &SluiceConfig) -> Vec<String> {
    let id = object_id(deployment);
    let pod = &deployment["spec"]["template"]["spec"];
    let c = container(deployment);
    let mut errors = Vec::new();

    let port = listen_port(config);
    if !c["ports"].as_array().into_iter().flatten().any(|p| p["containerPort"].as_i64() == Some(port)) {
        errors.push(format!("{id}: no containerPort for observe.listen ({port})"));
    }
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        if get["path"] != path || resolve_port(c, &get["port"]) != Some(port) {
            errors.push(format!(
                "{id}: {probe} must be an httpGet of {path} on the metrics port {port}, is {}",
                c[probe]
            ));
        }
    }

    let drain = config.runtime.drain_timeout_ms as i64;
    match pod["terminationGracePeriodSeconds"].as_i64() {
        Some(grace) if grace * 1000 > drain => {}
        grace => errors.push(format!(
            "{id}: terminationGracePeriodSeconds ({grace:?}) must be set and above runtime.drain_timeout_ms ({drain} ms)"
        )),
    }

    let pod_sc = &pod["securityContext"];
    let sc = &c["securityContext"];
    let either = |field: &str| if sc[field].is_null() { &pod_sc[field] } else { &sc[field] };
    if either("runAsNonRoot") != true {
        errors.push(format!("{id}: runAsNonRoot must be true"));
    }
    if either("seccompProfile")["type"] != "RuntimeDefault" {
        errors.push(format!("{id}: seccompProfile must be RuntimeDefault"));
    }
    if either("runAsUser").as_i64().is_none_or(|uid| uid == 0) {
        errors.push(format!("{id}: runAsUser must be a non-zero uid (the image's user is 10001)"));
    }
    if sc["allowPrivilegeEscalation"] != false {
        errors.push(format!("{id}: allowPrivilegeEscalation must be false"));
    }
    if sc["readOnlyRootFilesystem"] != true {
        errors.push(format!("{id}: readOnlyRootFilesystem must be true"));
    }
    if sc["privileged"] == true {
        errors.push(format!("{id}: privileged"));
    }
    let drops_all = sc["capabilities"]["drop"].as_array().is_some_and(|d| d.iter().any(|c| c == "ALL"));
    if !drops_all || !sc["capabilities"]["add"].is_null() {
        errors.push(format!("{id}: capabilities must drop ALL and add none"));
    }
    if pod["automountServiceAccountToken"] != false {
        errors.push(format!("{id}: automountServiceAccountToken must be false (Sluice never calls the API)"));
    }
    let tmp_mounted = c["volumeMounts"].as_array().into_iter().flatten().any(|m| m["mountPath"] == "/tmp");
    if !tmp_mounted {
        errors.push(format!("{id}: a read-only root filesystem needs a volume at /tmp"));
    }

    let resources = &c["resources"];
    for path in ["/requests/cpu", "/requests/memory", "/limits/memory"] {
        if resources.pointer(path).is_none() {
            errors.push(format!("{id}: resources{} is not set", path.replace('/', ".")));
        }
    }

    if deployment["spec"]["replicas"].is_number() {
        errors
            .push(format!("{id}: spec.replicas is set; the ScaledObject owns it (kubectl apply would fight the HPA)"));
    }
    errors
}

fn is_secret_word(name: &str) -> bool {
    let name = name.to_lowercase();
    SECRET_WORDS.iter().any(|w| name.contains(w))
}

/// Credentials only through `secretKeyRef`: no credential-looking variable with a
/// literal value, no password inside a value, and `$(VAR)` only of variables
/// defined before (Kubernetes leaves a later one unexpanded).
fn check_secrets(deployment: &Value) -> Vec<String> {
    let id = object_id(deployment);
    let mut errors = Vec::new();
    let mut defined: BTreeMap<&str, bool> = BTreeMap::new(); // name -> from a Secret
    for var in env_list(container(deployment)) {
        let name = var["name"].as_str().unwrap_or_default();
        let from_secret = !var["valueFrom"]["secretKeyRef"].is_null();
        let credential = SECRET_VARIABLES.contains(&name) || is_secret_word(name);
        if credential && !from_secret {
            errors.push(format!("{id}: {name} is a credential: set it with valueFrom.secretKeyRef, not a literal"));
        }
        if let Some(value) = var["value"].as_str() {
            let mut rest = value;
            while let Some(start) = rest.find("$(") {
                let Some(end) = rest[start..].find(')') else { break };
                let referenced = &rest[start + 2..start + end];
                if !defined.contains_key(referenced) {
                    errors.push(format!("{id}: {name} uses $({referenced}), which is not defined before it"));
                }
                rest = &rest[start + end..];
            }
            let lower = value.to_lowercase();
            if lower.contains("password=")
                || value.split("://").nth(1).is_some_and(|r| r.split('/').next().is_some_and(|a| a.contains('@')))
            {
                errors.push(format!("{id}: {name} holds a credential in its value"));
            }
            for (key, v) in figment_table(value).unwrap_or_default() {
                let reference = v.strip_prefix("$(").and_then(|r| r.strip_suffix(')'));
                let secret_reference = reference.is_some_and(|r| defined.get(r) == Some(&true));
                if is_secret_word(&key) && !secret_reference {
                    errors.push(format!("{id}: {name}: {key} must be $(VAR) of a variable set from a Secret"));
                }
            }
        }
        defined.insert(name, from_secret);
    }
    errors
}

/// A raw value of a TOML table by its dotted path (the file as written, before
/// Sluice reads it: a credential must not be in it at all).
fn raw<'a>(table: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

fn raw_str<'a>(table: &'a toml::Table, path: &str) -> &'a str {
    raw(table, path).and_then(toml::Value::as_str).unwrap_or_default()
}

/// No Secret objects in the manifests, and no credentials in a ConfigMap.
fn check_no_secret_material(objects: &[Value]) -> Vec<String> {
    let mut errors = Vec::new();
    for object in objects {
        if object["kind"] == "Secret" {
            errors.push(format!("{}: Secrets are created by the operator, never kept here", object_id(object)));
        }
    }
    for config_map in of_kind(objects, "ConfigMap") {
        for (key, text) in config_map["data"].as_object().into_iter().flatten() {
            let Ok(table) = text.as_str().unwrap_or_default().parse::<toml::Table>() else { continue };
            let id = format!("{} {key}", object_id(config_map));
            if raw_str(&table, "postgres.dsn").to_lowercase().contains("password") {
                errors.push(format!("{id}: postgres.dsn holds a password; use SLUICE_POSTGRES__DSN from a Secret"));
            }
            if raw_str(&table, "control.redis_url").contains('@') {
                errors.push(format!(
                    "{id}: control.redis_url holds credentials; use SLUICE_CONTROL__REDIS_URL from a Secret"
                ));
            }
            for map in ["kafka.properties", "kafka.consumer_properties", "kafka.producer_properties"] {
                for property in raw(&table, map).and_then(toml::Value::as_table).into_iter().flat_map(|t| t.keys()) {
                    if is_secret_word(property) {
                        errors.push(format!("{id}: {map}.{property} is a credential; set it from a Secret"));
                    }
                }
            }
        }
    }
    errors
}

/// The stage's one ScaledObject: replicas bounded by the partitions, and kafka
/// triggers on exactly the (group, topic) pairs the stage consumes, at Sluice's
/// brokers, with Sluice's TLS and SASL settings.
fn check_scaling(objects: &[Value], stage: &str, deployment: &Value, config: &SluiceConfig) -> Vec<String> {
    let name = deployment["metadata"]["name"].as_str().unwrap_or_default();
    let scaled: Vec<_> =
        of_kind(objects, "ScaledObject").filter(|s| s["spec"]["scaleTargetRef"]["name"] == name).collect();
    let [scaled] = scaled.as_slice() else {
        return vec![format!("stage {stage}: {} ScaledObjects target {name}, one expected", scaled.len())];
    };
    let id = object_id(scaled);
    let spec = &scaled["spec"];
    let mut errors = Vec::new();
    let partitions = i64::from(config.topics.partitions);
    let max = spec["maxReplicaCount"].as_i64().unwrap_or(100); // KEDA's default
    let min = spec["minReplicaCount"].as_i64().unwrap_or(0);
    if max > partitions {
        errors.push(format!(
            "{id}: maxReplicaCount {max} is above topics.partitions ({partitions}): the extra replicas would sit idle"
        ));
    }
    if min > max {
        errors.push(format!("{id}: minReplicaCount {min} is above maxReplicaCount {max}"));
    }

    let brokers = config.kafka.brokers.as_str();
    let property = |key: &str| config.kafka.properties.get(key).map(|v| v.expose()).unwrap_or_default();
    let protocol = property("security.protocol").to_uppercase();
    let mechanism =
        if property("sasl.mechanisms").is_empty() { property("sasl.mechanism") } else { property("sasl.mechanisms") };
    let want_tls = if protocol.ends_with("SSL") { "enable" } else { "disable" };
    let want_sasl = match (protocol.starts_with("SASL"), mechanism.to_uppercase().as_str()) {
        (false, _) => "none",
        (true, "SCRAM-SHA-256") => "scram_sha256",
        (true, "SCRAM-SHA-512") => "scram_sha512",
        (true, "OAUTHBEARER") => "oauthbearer",
        (true, "GSSAPI") => "gssapi",
        (true, _) => "plaintext",
    };
    let mut triggered = BTreeSet::new();
    for trigger in spec["triggers"].as_array().into_iter().flatten() {
        if trigger["type"] != "kafka" {
            continue;
        }
        let m = &trigger["metadata"];
        triggered.insert((
            m["consumerGroup"].as_str().unwrap_or_default().to_string(),
            m["topic"].as_str().unwrap_or_default().to_string(),
        ));
        if m["bootstrapServers"] != brokers {
            errors.push(format!("{id}: bootstrapServers {} is not kafka.brokers ({brokers})", m["bootstrapServers"]));
        }
        if m["tls"].as_str().unwrap_or("disable") != want_tls {
            errors.push(format!("{id}: tls {} but security.protocol is {protocol:?}", m["tls"]));
        }
        if m["sasl"].as_str().unwrap_or("none") != want_sasl {
            errors.push(format!("{id}: sasl {} but Sluice uses {protocol:?} {mechanism:?}", m["sasl"]));
        }
        let auth = trigger["authenticationRef"]["name"].as_str();
        if want_sasl != "none"
            && auth.is_none_or(|a| of_kind(objects, "TriggerAuthentication").all(|t| t["metadata"]["name"] != a))
        {
            errors.push(format!("{id}: authenticationRef {auth:?} names no TriggerAuthentication"));
        }
    }
    let expected = consumers(stage, config);
    if triggered != expected {
        errors.push(format!(
            "{id}: kafka triggers on (consumer group, topic) {triggered:?}, but `sluice run {stage}` consumes {expected:?}"
        ));
    }
    errors
}

/// Every ScaledObject scales a Deployment of these manifests.
fn check_scaled_object_targets(objects: &[Value]) -> Vec<String> {
    let mut errors = Vec::new();
    for scaled in of_kind(objects, "ScaledObject") {
        let target = &scaled["spec"]["scaleTargetRef"];
        let kind_ok = target["kind"].as_str().is_none_or(|k| k == "Deployment");
        let exists = of_kind(objects, "Deployment").any(|d| d["metadata"]["name"] == target["name"]);
        if !kind_ok || !exists {
            errors.push(format!("{}: scaleTargetRef {target} is no Deployment of these manifests", object_id(scaled)));
        }
    }
    errors
}

/// A PodDisruptionBudget and a Service that select this stage's pods and no
/// other's, the Service reaching the metrics port and scraped by a ServiceMonitor.
fn check_disruption_and_service(
    objects: &[Value],
    stage: &str,
    deployment: &Value,
    config: &SluiceConfig,
) -> Vec<String> {
    let labels = pod_labels(deployment);
    let others: Vec<_> =
        of_kind(objects, "Deployment").filter(|d| d["metadata"]["name"] != deployment["metadata"]["name"]).collect();
    let only_this =
        |selector: &Value| selects(selector, labels) && others.iter().all(|o| !selects(selector, pod_labels(o)));
    let mut errors = Vec::new();

    let pdbs: Vec<_> =
        of_kind(objects, "PodDisruptionBudget").filter(|p| only_this(&p["spec"]["selector"]["matchLabels"])).collect();
    match pdbs.as_slice() {
        [pdb]
            if pdb["spec"]["maxUnavailable"].as_i64().unwrap_or(0) >= 1
                || pdb["spec"]["maxUnavailable"].is_string() => {}
        [pdb] => errors.push(format!("{}: maxUnavailable must allow one replica at a time", object_id(pdb))),
        found => errors
            .push(format!("stage {stage}: {} PodDisruptionBudgets select its pods alone, one expected", found.len())),
    }

    let c = container(deployment);
    let port = listen_port(config);
    let services: Vec<_> = of_kind(objects, "Service").filter(|s| only_this(&s["spec"]["selector"])).collect();
    let [service] = services.as_slice() else {
        errors.push(format!("stage {stage}: {} Services select its pods alone, one expected", services.len()));
        return errors;
    };
    let metrics =
        service["spec"]["ports"].as_array().into_iter().flatten().find(|p| {
            resolve_port(c, if p["targetPort"].is_null() { &p["port"] } else { &p["targetPort"] }) == Some(port)
        });
    let Some(metrics) = metrics else {
        errors.push(format!("{}: no port reaches the metrics port {port}", object_id(service)));
        return errors;
    };
    let monitored = of_kind(objects, "ServiceMonitor").any(|m| {
        selects(&m["spec"]["selector"]["matchLabels"], &service["metadata"]["labels"])
            && m["spec"]["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["port"] == metrics["name"] && e["path"].as_str().unwrap_or("/metrics") == "/metrics")
    });
    if !monitored {
        errors.push(format!(
            "{}: no ServiceMonitor scrapes its port {} at /metrics",
            object_id(service),
            metrics["name"]
        ));
    }
    errors
}

/// Ingress only from namespaces (the monitoring one) to the metrics port; egress
/// to DNS, the brokers, Redis and PostgreSQL.
fn check_network_policy(objects: &[Value], deployment: &Value, config: &SluiceConfig) -> Vec<String> {
    let id = object_id(deployment);
    let labels = pod_labels(deployment);
    let policies: Vec<_> = of_kind(objects, "NetworkPolicy")
        .filter(|p| selects(&p["spec"]["podSelector"]["matchLabels"], labels))
        .collect();
    let types = |p: &Value, t: &str| p["spec"]["policyTypes"].as_array().is_some_and(|a| a.iter().any(|x| x == t));
    let mut errors = Vec::new();
    if !policies.iter().any(|p| types(p, "Ingress")) || !policies.iter().any(|p| types(p, "Egress")) {
        errors.push(format!("{id}: no NetworkPolicy restricts both its Ingress and its Egress"));
        return errors;
    }
    let port = listen_port(config);
    let c = container(deployment);
    let mut egress = BTreeSet::new();
    for policy in &policies {
        for rule in policy["spec"]["ingress"].as_array().into_iter().flatten() {
            let from = rule["from"].as_array().map(Vec::as_slice).unwrap_or_default();
            let from_namespaces = !from.is_empty()
                && from.iter().all(|peer| {
                    peer["ipBlock"].is_null()
                        && peer["namespaceSelector"]["matchLabels"].as_object().is_some_and(|m| !m.is_empty())
                });
            let ports = rule["ports"].as_array().map(Vec::as_slice).unwrap_or_default();
            let metrics_only = !ports.is_empty() && ports.iter().all(|p| resolve_port(c, &p["port"]) == Some(port));
            if !from_namespaces || !metrics_only {
                errors.push(format!(
                    "{}: an ingress rule must allow only the metrics port {port} from a named namespace: {rule}",
                    object_id(policy)
                ));
            }
        }
        for rule in policy["spec"]["egress"].as_array().into_iter().flatten() {
            let ports = rule["ports"].as_array().map(Vec::as_slice).unwrap_or_default();
            if ports.is_empty() {
                errors.push(format!("{}: an egress rule without ports allows everything: {rule}", object_id(policy)));
            }
            for p in ports {
                egress.insert((p["protocol"].as_str().unwrap_or("TCP").to_string(), p["port"].as_i64().unwrap_or(0)));
            }
        }
    }
    let tcp = |port: i64| ("TCP".to_string(), port);
    if !egress.contains(&("UDP".to_string(), 53)) || !egress.contains(&tcp(53)) {
        errors.push(format!("{id}: egress to DNS (53/UDP and 53/TCP) is not allowed"));
    }
    for broker in config.kafka.brokers.split(',') {
        let broker_port = broker.rsplit_once(':').and_then(|(_, p)| p.trim().parse().ok()).unwrap_or(0);
        if !egress.contains(&tcp(broker_port)) {
            errors.push(format!("{id}: egress to Kafka ({broker}) is not allowed"));
        }
    }
    for (what, port) in [("Redis", 6379), ("PostgreSQL", 5432)] {
        if !egress.contains(&tcp(port)) {
            errors.push(format!("{id}: egress to {what} ({port}/TCP) is not allowed"));
        }
    }
    errors
}

/// The GPU variant's inferrer: a GPU limit, the toleration, a nodeSelector, both
/// models on `cuda` and the CUDA image. Elsewhere no GPU is asked for.
fn check_gpu(stage: &str, deployment: &Value, config: &SluiceConfig, gpu: bool) -> Vec<String> {
    let id = object_id(deployment);
    let pod = &deployment["spec"]["template"]["spec"];
    let c = container(deployment);
    let limit = c["resources"]["limits"]["nvidia.com/gpu"]
        .as_i64()
        .or_else(|| c["resources"]["limits"]["nvidia.com/gpu"].as_str().and_then(|s| s.parse().ok()));
    let devices = [config.inferrer.model.device, config.inferrer.query.model.device];
    let mut errors = Vec::new();
    if !(gpu && stage == "inferrer") {
        if limit.is_some() {
            errors.push(format!("{id}: asks for a GPU, but this render runs no GPU {stage}"));
        }
        return errors;
    }
    if limit.unwrap_or(0) < 1 {
        errors.push(format!("{id}: the GPU inferrer needs resources.limits[\"nvidia.com/gpu\"] >= 1"));
    }
    let tolerates = pod["tolerations"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["key"] == "nvidia.com/gpu" && t["effect"].as_str().is_none_or(|e| e == "NoSchedule"));
    if !tolerates {
        errors.push(format!("{id}: the GPU inferrer needs a toleration for the nvidia.com/gpu taint"));
    }
    if pod["nodeSelector"].as_object().is_none_or(serde_json::Map::is_empty) {
        errors.push(format!("{id}: the GPU inferrer needs a nodeSelector for GPU nodes"));
    }
    if devices != [DeviceChoice::Cuda, DeviceChoice::Cuda] {
        errors.push(format!("{id}: the GPU inferrer must set inferrer.model.device and inferrer.query.model.device to cuda, has {devices:?}"));
    }
    if !c["image"].as_str().unwrap_or_default().contains("cuda") {
        errors.push(format!("{id}: the GPU inferrer must run the CUDA image, runs {}", c["image"]));
    }
    errors
}

/// Overlays pin the image to a tag (or digest) other than `latest`.
fn check_image(deployment: &Value, expect: &Expect) -> Vec<String> {
    let image = ImageRef::parse(container(deployment)["image"].as_str().unwrap_or_default());
    let pinned = image.digest.is_some() || image.tag.as_deref().is_some_and(|t| t != "latest");
    if expect.pinned_images && !pinned {
        return vec![format!(
            "{}: image {image} needs a tag other than latest (set by the overlay)",
            object_id(deployment)
        )];
    }
    Vec::new()
}

/// Every object in the overlay's namespace, which the overlay creates.
fn check_namespace(objects: &[Value], expect: &Expect) -> Vec<String> {
    let Some(namespace) = expect.namespace else { return Vec::new() };
    let mut errors = Vec::new();
    for object in objects {
        if object["kind"] == "Namespace" {
            continue;
        }
        if object["metadata"]["namespace"] != namespace {
            errors.push(format!(
                "{}: namespace {} is not {namespace}",
                object_id(object),
                object["metadata"]["namespace"]
            ));
        }
    }
    if !of_kind(objects, "Namespace").any(|n| n["metadata"]["name"] == namespace) {
        errors.push(format!("namespace {namespace} is not created by the overlay"));
    }
    errors
}

// ---------------------------------------------------------------------------
// The Kubernetes tests

#[test]
fn every_kustomization_renders_and_uses_every_file() {
    let mut used = BTreeSet::new();
    for what in ["base", "dev", "prod"] {
        let dir = if what == "base" { k8s_dir().join("base") } else { k8s_dir().join("overlays").join(what) };
        let objects = render(&dir, &mut used).unwrap_or_else(|e| panic!("k8s/{what}: {e}"));
        let kinds: BTreeSet<_> = objects.iter().map(|o| o["kind"].as_str().unwrap_or_default()).collect();
        for kind in [
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "ScaledObject",
            "TriggerAuthentication",
            "ServiceMonitor",
            "NetworkPolicy",
            "ConfigMap",
        ] {
            assert!(kinds.contains(kind), "k8s/{what} renders no {kind}");
        }
    }
    // A file no kustomization reads is a change that would never be applied.
    let mut unused = Vec::new();
    for sub in ["base", "overlays", "components"] {
        let mut stack = vec![k8s_dir().join(sub)];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).expect("read k8s/").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if !used.contains(&canonical(&path)) {
                    unused.push(path.display().to_string());
                }
            }
        }
    }
    assert!(unused.is_empty(), "files under k8s/ that no kustomization uses: {unused:?}");
}

#[test]
fn every_object_matches_the_schema_of_its_kind() {
    for what in ["base", "dev", "prod"] {
        let objects = rendered(what);
        assert_no_errors(&format!("k8s/{what} against k8s/schemas"), &schema_errors(&objects));
    }
}

#[test]
fn every_render_follows_sluices_rules() {
    for what in ["base", "dev", "prod"] {
        let objects = rendered(what);
        assert_no_errors(&format!("k8s/{what}"), &check_all(&objects, &expect(what)));
    }
    // Overlays really differ where they should.
    for (overlay, gpu) in OVERLAYS {
        let objects = rendered(overlay);
        let inferrer =
            of_kind(&objects, "Deployment").find(|d| d["metadata"]["name"] == "sluice-inferrer").expect("inferrer");
        assert_eq!(
            !container(inferrer)["resources"]["limits"]["nvidia.com/gpu"].is_null(),
            gpu,
            "{overlay}: GPU variant"
        );
    }
}

fn deployment_mut<'a>(objects: &'a mut [Value], stage: &str) -> &'a mut Value {
    objects
        .iter_mut()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == format!("sluice-{stage}"))
        .unwrap_or_else(|| panic!("no Deployment for {stage}"))
}

fn container_mut<'a>(objects: &'a mut [Value], stage: &str) -> &'a mut Value {
    &mut deployment_mut(objects, stage)["spec"]["template"]["spec"]["containers"][0]
}

fn object_mut<'a>(objects: &'a mut [Value], kind: &str, name: &str) -> &'a mut Value {
    objects
        .iter_mut()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn env_mut<'a>(objects: &'a mut [Value], stage: &str) -> &'a mut Vec<Value> {
    container_mut(objects, stage)["env"].as_array_mut().expect("env")
}

fn set_env(objects: &mut [Value], stage: &str, name: &str, value: &str) {
    env_mut(objects, stage).push(json!({"name": name, "value": value}));
}

fn remove_env(objects: &mut [Value], stage: &str, name: &str) {
    env_mut(objects, stage).retain(|e| e["name"] != name);
}

fn edit_config(objects: &mut [Value], edit: impl Fn(&str) -> String) {
    let config = object_mut(objects, "ConfigMap", "sluice-config");
    let text = config["data"]["sluice.toml"].as_str().expect("sluice.toml").to_string();
    let edited = edit(&text);
    assert_ne!(edited, text, "the edit changed nothing");
    config["data"]["sluice.toml"] = json!(edited);
}

fn remove_object(objects: &mut Vec<Value>, kind: &str, name: &str) {
    let before = objects.len();
    objects.retain(|o| !(o["kind"] == kind && o["metadata"]["name"] == name));
    assert_eq!(objects.len() + 1, before, "no {kind} {name} to remove");
}

/// (what is broken, on which render, how, a fragment of the error that must appear).
type Breakage = (&'static str, &'static str, fn(&mut Vec<Value>), &'static str);

const BREAKAGES: &[Breakage] = &[
    (
        "a stage's command",
        "dev",
        |o| container_mut(o, "fetcher")["args"] = json!(["run", "fetch"]),
        "stage fetcher: 0 Deployments",
    ),
    (
        "a sidecar",
        "dev",
        |o| {
            let sidecar = json!({"name": "proxy", "image": "envoy"});
            deployment_mut(o, "writer")["spec"]["template"]["spec"]["containers"]
                .as_array_mut()
                .expect("containers")
                .push(sidecar);
        },
        "2 containers",
    ),
    (
        "the liveness path",
        "dev",
        |o| container_mut(o, "fetcher")["livenessProbe"]["httpGet"]["path"] = json!("/health"),
        "livenessProbe",
    ),
    (
        "the readiness port",
        "prod",
        |o| container_mut(o, "inferrer")["readinessProbe"]["httpGet"]["port"] = json!(9101),
        "readinessProbe",
    ),
    (
        "the metrics port",
        "dev",
        |o| container_mut(o, "writer")["ports"][0]["containerPort"] = json!(9200),
        "no containerPort for observe.listen",
    ),
    (
        "the grace period",
        "dev",
        |o| deployment_mut(o, "normalizer")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(20),
        "terminationGracePeriodSeconds",
    ),
    (
        "the drain timeout, by environment",
        "prod",
        |o| set_env(o, "writer", "SLUICE_RUNTIME__DRAIN_TIMEOUT_MS", "45000"),
        "terminationGracePeriodSeconds",
    ),
    (
        "the drain timeout, in sluice.toml",
        "dev",
        |o| edit_config(o, |t| t.replace("drain_timeout_ms = 20000", "drain_timeout_ms = 30000")),
        "terminationGracePeriodSeconds",
    ),
    (
        "runAsNonRoot",
        "dev",
        |o| container_mut(o, "fetcher")["securityContext"]["runAsNonRoot"] = json!(false),
        "runAsNonRoot",
    ),
    (
        "readOnlyRootFilesystem",
        "dev",
        |o| unset(&mut container_mut(o, "fetcher")["securityContext"], "readOnlyRootFilesystem"),
        "readOnlyRootFilesystem",
    ),
    (
        "allowPrivilegeEscalation",
        "prod",
        |o| container_mut(o, "inferrer")["securityContext"]["allowPrivilegeEscalation"] = json!(true),
        "allowPrivilegeEscalation",
    ),
    (
        "the dropped capabilities",
        "dev",
        |o| container_mut(o, "writer")["securityContext"]["capabilities"]["drop"] = json!(["NET_RAW"]),
        "drop ALL",
    ),
    (
        "the seccomp profile",
        "dev",
        |o| {
            unset(&mut deployment_mut(o, "normalizer")["spec"]["template"]["spec"]["securityContext"], "seccompProfile")
        },
        "seccompProfile",
    ),
    (
        "the uid",
        "dev",
        |o| deployment_mut(o, "normalizer")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = json!(0),
        "runAsUser",
    ),
    (
        "the service account token",
        "dev",
        |o| deployment_mut(o, "fetcher")["spec"]["template"]["spec"]["automountServiceAccountToken"] = json!(true),
        "automountServiceAccountToken",
    ),
    (
        "/tmp",
        "dev",
        |o| {
            container_mut(o, "fetcher")["volumeMounts"]
                .as_array_mut()
                .expect("mounts")
                .retain(|m| m["mountPath"] != "/tmp");
        },
        "/tmp",
    ),
    (
        "a literal DSN",
        "dev",
        |o| {
            remove_env(o, "writer", "SLUICE_POSTGRES__DSN");
            set_env(o, "writer", "SLUICE_POSTGRES__DSN", "host=db user=sluice password=hunter2");
        },
        "SLUICE_POSTGRES__DSN is a credential",
    ),
    (
        "a literal SASL password",
        "prod",
        |o| {
            remove_env(o, "normalizer", "SLUICE_KAFKA__PROPERTIES");
            set_env(
                o,
                "normalizer",
                "SLUICE_KAFKA__PROPERTIES",
                r#"{"sasl.username"="sluice", "sasl.password"="hunter2"}"#,
            );
        },
        "sasl.password must be $(VAR)",
    ),
    (
        "a password variable set literally",
        "dev",
        |o| {
            remove_env(o, "fetcher", "KAFKA_SASL_PASSWORD");
            env_mut(o, "fetcher").insert(1, json!({"name": "KAFKA_SASL_PASSWORD", "value": "hunter2"}));
        },
        "KAFKA_SASL_PASSWORD is a credential",
    ),
    (
        "a reference to a variable defined later",
        "dev",
        |o| {
            let env = env_mut(o, "inferrer");
            let at = env.iter().position(|e| e["name"] == "SLUICE_KAFKA__PROPERTIES").expect("properties");
            let properties = env.remove(at);
            env.insert(1, properties);
        },
        "which is not defined before it",
    ),
    (
        "a Redis password in sluice.toml",
        "dev",
        |o| edit_config(o, |t| format!("{t}\n[control]\nredis_url = \"redis://:hunter2@redis:6379\"\n")),
        "control.redis_url holds credentials",
    ),
    (
        "a SASL password in sluice.toml",
        "dev",
        |o| {
            edit_config(o, |t| t.replace("\"sasl.mechanisms\"", "\"sasl.password\" = \"hunter2\"\n\"sasl.mechanisms\""))
        },
        "kafka.properties.sasl.password is a credential",
    ),
    (
        "a Secret in the manifests",
        "prod",
        |o| {
            o.push(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sluice-postgres", "namespace": "sluice"}, "stringData": {"dsn": "x"}}))
        },
        "Secrets are created by the operator",
    ),
    // Sluice's own loader refuses it (SluiceConfig::validate), naming the key.
    ("the writer's DSN", "dev", |o| remove_env(o, "writer", "SLUICE_POSTGRES__DSN"), "key `postgres.dsn`: empty"),
    (
        "an unknown key in sluice.toml",
        "dev",
        |o| {
            edit_config(o, |t| t.replace("drain_timeout_ms = 20000", "drain_timeout_ms = 20000\ndrain_timeout = 20000"))
        },
        "unknown key runtime.drain_timeout",
    ),
    (
        "a key of the wrong type in sluice.toml",
        "dev",
        |o| edit_config(o, |t| t.replace("partitions = 6", "partitions = \"6\"")),
        "topics.partitions has type string",
    ),
    (
        "an unknown SLUICE_ variable",
        "dev",
        |o| set_env(o, "fetcher", "SLUICE_FETCHER__SORCE", "postgres"),
        "unknown key fetcher.sorce",
    ),
    (
        "SLUICE_CONFIG",
        "dev",
        |o| {
            let env = env_mut(o, "normalizer");
            env[0]["value"] = json!("/etc/sluice/other.toml");
        },
        "has no key other.toml",
    ),
    (
        "maxReplicaCount above the partitions",
        "prod",
        |o| object_mut(o, "ScaledObject", "sluice-writer")["spec"]["maxReplicaCount"] = json!(7),
        "above topics.partitions",
    ),
    (
        "fewer partitions than replicas",
        "prod",
        |o| edit_config(o, |t| t.replace("partitions = 6", "partitions = 4")),
        "above topics.partitions",
    ),
    (
        "minReplicaCount above maxReplicaCount",
        "dev",
        |o| object_mut(o, "ScaledObject", "sluice-fetcher")["spec"]["minReplicaCount"] = json!(3),
        "minReplicaCount 3 is above",
    ),
    (
        "a consumer group",
        "dev",
        |o| {
            object_mut(o, "ScaledObject", "sluice-normalizer")["spec"]["triggers"][0]["metadata"]["consumerGroup"] =
                json!("normalizer")
        },
        "kafka triggers on",
    ),
    (
        "a topic",
        "prod",
        |o| {
            object_mut(o, "ScaledObject", "sluice-writer")["spec"]["triggers"][0]["metadata"]["topic"] =
                json!("sluice.predictions")
        },
        "kafka triggers on",
    ),
    (
        "the group prefix",
        "dev",
        |o| edit_config(o, |t| t.replace("group_prefix = \"sluice\"", "group_prefix = \"pipeline\"")),
        "kafka triggers on",
    ),
    (
        "the kinds the inferrer serves",
        "prod",
        |o| set_env(o, "inferrer", "SLUICE_INFERRER__SERVE", r#"["query"]"#),
        "kafka triggers on",
    ),
    (
        "the brokers",
        "dev",
        |o| {
            object_mut(o, "ScaledObject", "sluice-fetcher")["spec"]["triggers"][0]["metadata"]["bootstrapServers"] =
                json!("kafka:9092")
        },
        "bootstrapServers",
    ),
    (
        "KEDA's TLS",
        "prod",
        |o| {
            object_mut(o, "ScaledObject", "sluice-inferrer")["spec"]["triggers"][1]["metadata"]["tls"] =
                json!("disable")
        },
        "tls \"disable\"",
    ),
    (
        "KEDA's SASL mechanism",
        "dev",
        |o| {
            object_mut(o, "ScaledObject", "sluice-inferrer")["spec"]["triggers"][0]["metadata"]["sasl"] =
                json!("plaintext")
        },
        "sasl \"plaintext\"",
    ),
    (
        "the TriggerAuthentication",
        "dev",
        |o| remove_object(o, "TriggerAuthentication", "sluice-kafka"),
        "names no TriggerAuthentication",
    ),
    (
        "a ScaledObject's target",
        "dev",
        |o| object_mut(o, "ScaledObject", "sluice-writer")["spec"]["scaleTargetRef"]["name"] = json!("sluice-writr"),
        "is no Deployment of these manifests",
    ),
    (
        "a ScaledObject",
        "dev",
        |o| remove_object(o, "ScaledObject", "sluice-normalizer"),
        "0 ScaledObjects target sluice-normalizer",
    ),
    (
        "replicas on a Deployment",
        "prod",
        |o| deployment_mut(o, "fetcher")["spec"]["replicas"] = json!(3),
        "spec.replicas is set",
    ),
    (
        "a PodDisruptionBudget",
        "dev",
        |o| remove_object(o, "PodDisruptionBudget", "sluice-writer"),
        "0 PodDisruptionBudgets",
    ),
    (
        "a PodDisruptionBudget's selector",
        "prod",
        |o| {
            object_mut(o, "PodDisruptionBudget", "sluice-fetcher")["spec"]["selector"]["matchLabels"] =
                json!({"app.kubernetes.io/part-of": "sluice"})
        },
        "0 PodDisruptionBudgets",
    ),
    (
        "a PodDisruptionBudget that blocks drains",
        "dev",
        |o| object_mut(o, "PodDisruptionBudget", "sluice-fetcher")["spec"]["maxUnavailable"] = json!(0),
        "maxUnavailable",
    ),
    ("a Service", "dev", |o| remove_object(o, "Service", "sluice-inferrer"), "0 Services"),
    (
        "a Service's port",
        "dev",
        |o| object_mut(o, "Service", "sluice-writer")["spec"]["ports"][0]["targetPort"] = json!(8080),
        "no port reaches the metrics port",
    ),
    (
        "the ServiceMonitor's port",
        "prod",
        |o| object_mut(o, "ServiceMonitor", "sluice")["spec"]["endpoints"][0]["port"] = json!("http"),
        "no ServiceMonitor scrapes",
    ),
    (
        "the NetworkPolicy's selector",
        "dev",
        |o| object_mut(o, "NetworkPolicy", "sluice")["spec"]["podSelector"]["matchLabels"] = json!({"app": "sluice"}),
        "no NetworkPolicy restricts",
    ),
    (
        "ingress from anywhere",
        "prod",
        |o| {
            object_mut(o, "NetworkPolicy", "sluice")["spec"]["ingress"][0]["from"] =
                json!([{"ipBlock": {"cidr": "0.0.0.0/0"}}])
        },
        "an ingress rule must allow only",
    ),
    (
        "ingress to another port",
        "dev",
        |o| object_mut(o, "NetworkPolicy", "sluice")["spec"]["ingress"][0]["ports"][0]["port"] = json!(8080),
        "an ingress rule must allow only",
    ),
    (
        "egress to DNS",
        "dev",
        |o| {
            object_mut(o, "NetworkPolicy", "sluice")["spec"]["egress"][0]["ports"]
                .as_array_mut()
                .expect("ports")
                .remove(0);
        },
        "DNS",
    ),
    (
        "egress to the brokers' port",
        "prod",
        |o| edit_config(o, |t| t.replace("svc:9093\"", "svc:9092\"")),
        "egress to Kafka",
    ),
    (
        "egress to everything",
        "dev",
        |o| object_mut(o, "NetworkPolicy", "sluice")["spec"]["egress"].as_array_mut().expect("egress").push(json!({})),
        "allows everything",
    ),
    (
        "the GPU limit",
        "prod",
        |o| unset(&mut container_mut(o, "inferrer")["resources"]["limits"], "nvidia.com/gpu"),
        "nvidia.com/gpu",
    ),
    (
        "the GPU toleration",
        "prod",
        |o| unset(&mut deployment_mut(o, "inferrer")["spec"]["template"]["spec"], "tolerations"),
        "toleration",
    ),
    (
        "the GPU nodeSelector",
        "prod",
        |o| unset(&mut deployment_mut(o, "inferrer")["spec"]["template"]["spec"], "nodeSelector"),
        "nodeSelector",
    ),
    (
        "the CUDA device",
        "prod",
        |o| remove_env(o, "inferrer", "SLUICE_INFERRER__QUERY__MODEL__DEVICE"),
        "device to cuda",
    ),
    (
        "the CUDA image",
        "prod",
        |o| container_mut(o, "inferrer")["image"] = json!("registry.example.com/sluice:0.1.0"),
        "CUDA image",
    ),
    (
        "a GPU outside the GPU variant",
        "dev",
        |o| container_mut(o, "writer")["resources"]["limits"]["nvidia.com/gpu"] = json!(1),
        "asks for a GPU",
    ),
    (
        "an unpinned image",
        "prod",
        |o| container_mut(o, "writer")["image"] = json!("registry.example.com/sluice:latest"),
        "tag other than latest",
    ),
    (
        "the resource requests",
        "dev",
        |o| unset(&mut container_mut(o, "normalizer")["resources"], "requests"),
        "resources.requests.cpu",
    ),
    (
        "the namespace",
        "prod",
        |o| object_mut(o, "Service", "sluice-fetcher")["metadata"]["namespace"] = json!("default"),
        "is not sluice",
    ),
];

#[test]
fn each_rule_refuses_a_manifest_broken_on_purpose() {
    let mut renders = BTreeMap::new();
    for (what, render, breakage, expected) in BREAKAGES {
        let objects = renders.entry(*render).or_insert_with(|| rendered(render));
        assert_no_errors(&format!("k8s/{render} before breaking {what}"), &check_all(objects, &expect(render)));
        let mut broken = objects.clone();
        breakage(&mut broken);
        let errors = check_all(&broken, &expect(render));
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "breaking {what} in k8s/{render} must give an error with {expected:?}; got {errors:#?}"
        );
    }
}

#[test]
fn the_schemas_refuse_misspelt_and_mistyped_fields() {
    let objects = rendered("prod");
    // (kind, name, a field to set, its value): a misspelt name or a wrong type each.
    let cases: Vec<(&str, &str, &str, Value)> = vec![
        (
            "Deployment",
            "sluice-fetcher",
            "/spec/template/spec/containers/0/livenessProbe/httpGet/pth",
            json!("/healthz"),
        ),
        ("Deployment", "sluice-fetcher", "/spec/template/spec/terminationGracePeriodSeconds", json!("30")),
        (
            "Deployment",
            "sluice-writer",
            "/spec/template/spec/containers/0/securityContext/readOnlyRootFilesystm",
            json!(true),
        ),
        (
            "Deployment",
            "sluice-inferrer",
            "/spec/template/spec/containers/0/env/0/valueFrom",
            json!({"secretRef": {"name": "x"}}),
        ),
        ("Service", "sluice-fetcher", "/spec/ports/0/port", json!("metrics")),
        ("PodDisruptionBudget", "sluice-writer", "/spec/maxUnavailble", json!(1)),
        ("NetworkPolicy", "sluice", "/spec/policyType", json!(["Ingress"])),
        ("ScaledObject", "sluice-writer", "/spec/maxReplicas", json!(6)),
        ("ScaledObject", "sluice-writer", "/spec/triggers/0/metadata/consumergroup", json!("sluice-writer")),
        ("ScaledObject", "sluice-writer", "/spec/triggers/0/metadata/lagThreshold", json!(1000)),
        ("TriggerAuthentication", "sluice-kafka", "/spec/secretTargetRef/0/secret", json!("x")),
        ("ServiceMonitor", "sluice", "/spec/endpoints/0/intervall", json!("15s")),
        ("ConfigMap", "sluice-config", "/data/sluice.toml", json!(1)),
    ];
    for (kind, name, pointer, value) in cases {
        let mut object =
            objects.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name).cloned().expect("object");
        let (parent, last) = pointer.rsplit_once('/').expect("pointer");
        match object.pointer_mut(parent) {
            Some(Value::Object(map)) => {
                map.insert(last.to_string(), value);
            }
            other => panic!("{kind} {name}: {parent} is {other:?}"),
        }
        let errors = schema_errors(&[object]);
        // The error names the field (an unexpected property) or points at it (a wrong type).
        assert!(
            errors.iter().any(|e| e.contains(last)),
            "{kind} {name} with {pointer} must fail its schema: {errors:?}"
        );
    }
    // A kind without a schema is an error too, not a pass.
    let unknown = json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "x"}});
    assert!(schema_errors(&[unknown]).iter().any(|e| e.contains("no schema")));
}

/// A throw-away kustomization under the system's temporary folder.
fn scratch_kustomization(name: &str, kustomization: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-manifests-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("temp dir");
    fs::write(dir.join("kustomization.yaml"), kustomization).expect("write");
    for (file, text) in files {
        fs::write(dir.join(file), text).expect("write");
    }
    dir
}

#[test]
fn the_renderer_refuses_what_it_does_not_implement() {
    let head = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n";
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  a: b\n";
    let cases = [
        ("labels", format!("{head}resources: [cm.yaml]\ncommonLabels:\n  a: b\n"), "`commonLabels` is not rendered"),
        ("missing", format!("{head}resources: [nothere.yaml]\n"), "does not exist"),
        (
            "smp",
            format!("{head}resources: [cm.yaml]\npatches:\n  - path: smp.yaml\n    target: {{kind: ConfigMap}}\n"),
            "only JSON 6902",
        ),
        (
            "nomatch",
            format!("{head}resources: [cm.yaml]\npatches:\n  - path: op.yaml\n    target: {{kind: Deployment}}\n"),
            "matches no object",
        ),
        (
            "badtest",
            format!("{head}resources: [cm.yaml]\npatches:\n  - path: test.yaml\n    target: {{kind: ConfigMap}}\n"),
            "test failed",
        ),
        ("twice", format!("{head}resources: [cm.yaml, cm.yaml]\n"), "defined twice"),
    ];
    for (name, kustomization, expected) in cases {
        let dir = scratch_kustomization(
            name,
            &kustomization,
            &[
                ("cm.yaml", cm),
                ("smp.yaml", "data:\n  a: c\n"),
                ("op.yaml", "- op: replace\n  path: /data/a\n  value: c\n"),
                ("test.yaml", "- op: test\n  path: /data/a\n  value: z\n"),
            ],
        );
        let result = render(&dir, &mut BTreeSet::new());
        let _ = fs::remove_dir_all(&dir);
        match result {
            Err(e) => assert!(e.contains(expected), "{name}: {e}"),
            Ok(_) => panic!("{name}: rendered, must fail with {expected:?}"),
        }
    }
    // And what it implements does what kustomize does.
    let dir = scratch_kustomization(
        "ok",
        &format!(
            "{head}namespace: n\nresources: [cm.yaml, d.yaml]\npatches:\n  - path: op.yaml\n    target: {{kind: ConfigMap, name: x}}\nimages:\n  - name: img\n    newName: reg:5000/img\n    newTag: \"1.0\"\n"
        ),
        &[
            ("cm.yaml", cm),
            ("op.yaml", "- op: add\n  path: /data/k~1v\n  value: c\n- op: remove\n  path: /data/a\n"),
            (
                "d.yaml",
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\nspec:\n  template:\n    spec:\n      containers:\n        - name: c\n          image: img\n",
            ),
        ],
    );
    let objects = render(&dir, &mut BTreeSet::new()).expect("renders");
    let _ = fs::remove_dir_all(&dir);
    assert_eq!(objects[0]["data"], json!({"k/v": "c"}));
    assert_eq!(objects[0]["metadata"]["namespace"], "n");
    assert_eq!(objects[1]["spec"]["template"]["spec"]["containers"][0]["image"], "reg:5000/img:1.0");
}

/// The same objects as `kubectl kustomize` (the configMapGenerator's hash
/// aside). `make setup` installs kubectl and points `KUBECTL` at it.
#[test]
fn the_renders_equal_kubectl_kustomize() {
    let kubectl = std::env::var_os("KUBECTL").map(PathBuf::from).or_else(|| {
        std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join("kubectl")).find(|p| p.is_file()))
    });
    let kubectl = kubectl.expect("kubectl is missing: run `make setup` (or set KUBECTL)");
    for what in ["base", "dev", "prod"] {
        let dir = if what == "base" { k8s_dir().join("base") } else { k8s_dir().join("overlays").join(what) };
        let output = std::process::Command::new(&kubectl).arg("kustomize").arg(&dir).output().expect("run kubectl");
        assert!(output.status.success(), "kubectl kustomize k8s/{what}: {}", String::from_utf8_lossy(&output.stderr));
        let text = String::from_utf8(output.stdout).expect("utf-8");
        // kustomize names the ConfigMap sluice-config-<hash>; this renderer does not.
        let unhashed: String = text
            .split("sluice-config-")
            .enumerate()
            .map(|(i, part)| if i == 0 { part.to_string() } else { format!("sluice-config{}", &part[10..]) })
            .collect();
        let by_id = |objects: Vec<Value>| -> BTreeMap<String, Value> {
            objects.into_iter().map(|o| (object_id(&o), o)).collect()
        };
        let theirs = by_id(yaml_documents(&unhashed).expect("kubectl's YAML"));
        let ours = by_id(rendered(what));
        assert_eq!(theirs.keys().collect::<Vec<_>>(), ours.keys().collect::<Vec<_>>(), "k8s/{what}: objects");
        for (id, object) in &ours {
            assert_eq!(&theirs[id], object, "k8s/{what}: {id} differs from kubectl kustomize");
        }
    }
}

/// The Prometheus Operator's rules are deploy/prometheus/alerts.yml's, in every
/// render (`alerts_dashboard.rs` checks those rules themselves).
#[test]
fn every_render_carries_the_alerting_rules() {
    let rules = read_one_yaml(&repo_root().join("deploy/prometheus/alerts.yml"));
    for what in ["base", "dev", "prod"] {
        let objects = rendered(what);
        let found: Vec<_> = of_kind(&objects, "PrometheusRule").collect();
        assert_eq!(found.len(), 1, "{what}: one PrometheusRule expected");
        assert_eq!(
            found[0]["spec"]["groups"], rules["groups"],
            "{what}: k8s/base/prometheus-rule.yaml's groups differ from deploy/prometheus/alerts.yml's"
        );
    }
}
