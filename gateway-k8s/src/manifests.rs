//! Manifest files: the no-cluster mode reads a file or a folder of Kubernetes manifests.

use std::path::{Path, PathBuf};

use crate::objects::{ManifestProblem, Objects};

/// Whether a file name is a manifest: `*.yaml`, `*.yml` or `*.json`, not hidden (Kubernetes
/// ConfigMap volumes keep their real files under `..data`; the visible names link to them).
pub fn is_manifest(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    !hidden && matches!(ext.as_deref(), Some("yaml" | "yml" | "json"))
}

/// The manifest files `path` names: the file itself, or a folder's manifests (not its
/// subfolders), sorted by name.
pub fn files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        std::fs::metadata(path)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        if p.is_file() && is_manifest(&p) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads every manifest under `path` (see [`files`]). A document that cannot be read is a
/// problem naming its file and position; the others still load. `Err` only when `path`
/// itself cannot be read.
pub fn load(path: &Path) -> std::io::Result<(Objects, Vec<ManifestProblem>)> {
    let mut objects = Objects::default();
    let mut problems = Vec::new();
    for file in files(path)? {
        let source = file.display().to_string();
        match std::fs::read_to_string(&file) {
            Ok(text) => problems.extend(objects.add_manifest(&source, &text)),
            Err(e) => problems.push(ManifestProblem { source, message: format!("cannot read: {e}") }),
        }
    }
    Ok((objects, problems))
}

/// The bytes of every manifest under `path`, to tell a real change from a touch.
pub fn fingerprint(path: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    files(path)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(&f).unwrap_or_default();
            (f, bytes)
        })
        .collect()
}
