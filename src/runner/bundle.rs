//! `agentops bundle DIR`: the init container of a runner pod whose agent runs in a team's own
//! image copies, from the operator's image, what the agent step needs into a volume the agent's
//! container mounts read-only: this `agentops`, the pinned Claude Code CLI, the shared libraries
//! both link against and the dynamic loader that goes with them. The agent's container starts
//! `DIR/ld.so --library-path DIR/lib DIR/agentops step agent`, and the step starts the CLI the
//! same way, so neither depends on the image's libc (glibc of any version, musl, none at all);
//! what the agent runs (its Bash tool, builds) is the image's own.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// File names in the bundle.
pub const AGENTOPS: &str = "agentops";
pub const CLAUDE: &str = "claude";
pub const LOADER: &str = "ld.so";
pub const LIB_DIR: &str = "lib";

/// Why a bundle could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Other(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io { path: path.to_path_buf(), source }
}

/// Copies this executable, `claude` (a path, or a name on PATH) and their libraries with the
/// loader into `dir`. Returns the files written.
pub fn bundle(dir: &Path, claude: &Path) -> Result<Vec<PathBuf>, BundleError> {
    let me = std::env::current_exe().map_err(io(Path::new("/proc/self/exe")))?;
    let claude = find_on_path(claude)?;
    let loader = interpreter(&me)?;
    let mut libs: Vec<(String, PathBuf)> = Vec::new();
    for bin in [&me, &claude] {
        for lib in needed(&loader, bin)? {
            if !libs.iter().any(|(n, _)| *n == lib.0) {
                libs.push(lib);
            }
        }
    }
    let lib_dir = dir.join(LIB_DIR);
    std::fs::create_dir_all(&lib_dir).map_err(io(&lib_dir))?;
    let mut written = Vec::new();
    let mut copy = |from: &Path, to: PathBuf| -> Result<(), BundleError> {
        std::fs::copy(from, &to).map_err(io(from))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o555)).map_err(io(&to))?;
        written.push(to);
        Ok(())
    };
    copy(&me, dir.join(AGENTOPS))?;
    copy(&claude, dir.join(CLAUDE))?;
    copy(&loader, dir.join(LOADER))?;
    for (name, path) in &libs {
        copy(path, lib_dir.join(name))?;
    }
    Ok(written)
}

/// The agent's command started through the bundle's loader, with only the bundle's libraries
/// (`--library-path` reaches no child: what the agent runs uses the image's own libc).
pub fn through_loader(mut cmd: crate::agent::AgentCommand, dir: &Path) -> crate::agent::AgentCommand {
    let program = std::mem::replace(&mut cmd.program, dir.join(LOADER));
    let mut args: Vec<String> = vec![
        "--library-path".into(),
        dir.join(LIB_DIR).to_string_lossy().into_owned(),
        "--argv0".into(),
        program.to_string_lossy().into_owned(),
        program.to_string_lossy().into_owned(),
    ];
    args.append(&mut cmd.args);
    cmd.args = args;
    cmd
}

fn find_on_path(bin: &Path) -> Result<PathBuf, BundleError> {
    let found = if bin.components().count() > 1 {
        Some(bin.to_path_buf())
    } else {
        std::env::var_os("PATH").iter().flat_map(std::env::split_paths).map(|d| d.join(bin)).find(|p| p.is_file())
    };
    let found = found.ok_or_else(|| {
        BundleError::Other(format!("the Claude Code CLI {} is not on PATH (set AGENTOPS_CLAUDE_BIN)", bin.display()))
    })?;
    std::fs::canonicalize(&found).map_err(io(&found))
}

/// The ELF interpreter (PT_INTERP) of a 64-bit little-endian executable: its dynamic loader.
pub fn interpreter(exe: &Path) -> Result<PathBuf, BundleError> {
    let mut f = std::fs::File::open(exe).map_err(io(exe))?;
    let mut header = [0u8; 64];
    f.read_exact(&mut header).map_err(io(exe))?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(BundleError::Other(format!("{} is not a 64-bit little-endian ELF file", exe.display())));
    }
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]) as u64;
    let u64_at = |b: &[u8], at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(a)
    };
    let (phoff, phentsize, phnum) = (u64_at(&header, 0x20), u16_at(&header, 0x36), u16_at(&header, 0x38));
    let mut ph = vec![0u8; (phentsize * phnum) as usize];
    f.seek(SeekFrom::Start(phoff)).map_err(io(exe))?;
    f.read_exact(&mut ph).map_err(io(exe))?;
    for i in 0..phnum as usize {
        let p = &ph[i * phentsize as usize..];
        if u32::from_le_bytes([p[0], p[1], p[2], p[3]]) == 3 {
            let (offset, size) = (u64_at(p, 8), u64_at(p, 32));
            let mut path = vec![0u8; size.min(4096) as usize];
            f.seek(SeekFrom::Start(offset)).map_err(io(exe))?;
            f.read_exact(&mut path).map_err(io(exe))?;
            let path = path.split(|b| *b == 0).next().unwrap_or_default();
            return Ok(PathBuf::from(String::from_utf8_lossy(path).into_owned()));
        }
    }
    Err(BundleError::Other(format!("{} has no dynamic loader (statically linked?)", exe.display())))
}

/// The shared libraries `bin` loads, as the loader resolves them (`ld.so --list`): (name, file).
fn needed(loader: &Path, bin: &Path) -> Result<Vec<(String, PathBuf)>, BundleError> {
    let out = std::process::Command::new(loader).arg("--list").arg(bin).output().map_err(io(loader))?;
    if !out.status.success() {
        return Err(BundleError::Other(format!(
            "{} --list {}: {}",
            loader.display(),
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse_list(&String::from_utf8_lossy(&out.stdout))
}

fn parse_list(text: &str) -> Result<Vec<(String, PathBuf)>, BundleError> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(" => ") else { continue };
        let path = rest.split(" (").next().unwrap_or_default().trim();
        if path == "not found" || path.is_empty() {
            return Err(BundleError::Other(format!("library {} not found", name.trim())));
        }
        libs.push((name.trim().to_string(), PathBuf::from(path)));
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loaders_list_gives_each_library_its_file() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x00007f01)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f03)\n";
        let libs = parse_list(text).unwrap();
        assert_eq!(
            libs,
            [
                ("libssl.so.3".to_string(), PathBuf::from("/lib/x86_64-linux-gnu/libssl.so.3")),
                ("libc.so.6".to_string(), PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6")),
            ]
        );
        assert!(parse_list("\tlibfoo.so.1 => not found\n").unwrap_err().to_string().contains("libfoo.so.1"));
    }

    #[test]
    fn a_bundle_runs_without_the_hosts_libraries() {
        let dir = tempfile::tempdir().unwrap();
        // `true` from the host stands in for the CLI: any dynamically linked program.
        let files = bundle(dir.path(), Path::new("true")).unwrap();
        assert!(files.iter().any(|f| f.ends_with("lib/libc.so.6")), "{files:?}");
        let loader = interpreter(&std::env::current_exe().unwrap()).unwrap();
        assert!(loader.to_string_lossy().contains("ld-linux"), "{}", loader.display());
        // The bundled CLI starts through the bundled loader with only the bundle's libraries.
        let ok = std::process::Command::new(dir.path().join(LOADER))
            .arg("--library-path")
            .arg(dir.path().join(LIB_DIR))
            .arg(dir.path().join(CLAUDE))
            .status()
            .unwrap();
        assert!(ok.success());
    }
}
