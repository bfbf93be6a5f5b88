//! The workspace: a private directory per execution holding the clone (`repo/`) and the
//! agent's HOME (`home/`, outside the clone so nothing of it can be committed).

use std::path::{Path, PathBuf};

/// Directories of one workspace.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub id: String,
    pub root: PathBuf,
    pub repo: PathBuf,
    pub home: PathBuf,
}

impl Workspace {
    /// Creates `<root>/agentops-<id>` with `repo/`, `home/` and `home/tmp`, readable by the owner only.
    pub fn create(workspace_root: &Path, id: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::create_dir_all(workspace_root)?;
        let root = workspace_root.join(format!("agentops-{id}"));
        std::fs::DirBuilder::new().mode(0o700).create(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
        let repo = root.join("repo");
        let home = root.join("home");
        for d in [&repo, &home, &home.join("tmp")] {
            std::fs::create_dir_all(d)?;
        }
        Ok(Self { id: id.to_string(), root, repo, home })
    }

    /// Removes the whole workspace.
    pub fn remove(path: &Path) -> std::io::Result<()> {
        match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}
