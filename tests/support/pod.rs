//! A kubelet for tests: runs the pod of a Job the controller rendered, on this machine, the way
//! a node would in the parts that matter for what the agent can reach. Each container is a
//! process tree in its own mount and PID namespaces (`unshare`), chrooted into a read-only
//! root that holds the image (the host's /usr and /etc, the agentops binary and Claude Code at
//! their paths) and exactly the container's volume mounts: Secret volumes hold only their
//! `items`, read-only mounts are read-only, emptyDirs are shared by the containers that mount
//! them. It runs as the pod's uid/gid, with only the container's env (plus the image's), its
//! command, in order: init containers one by one (stopping at the first failure, as with
//! `restartPolicy: Never`), then the main container. `/dev/termination-log` is a file per
//! container, read back as the kubelet does. A container whose image is not ours (a team's
//! agent image, [`Image::foreign`]) runs on an overlay of that image's root filesystem instead:
//! nothing of the host's is in it but the pod's volumes, `/proc` and the harmless devices.
//!
//! Needs root (mount namespaces); [`available`] says whether this machine can.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

/// What the image holds besides the host's /usr and /etc: host directories bound (read-only)
/// under `/opt/image/`, as an image would carry them, and the image's environment.
pub struct Image {
    /// (host directory, path in the container)
    pub dirs: Vec<(PathBuf, String)>,
    pub env: Vec<(String, String)>,
    /// Images that are not ours, by the name a container gives: a root filesystem of another
    /// distribution (nothing of the host's) and the image's env. A container of one runs on an
    /// overlay of that root, as a container runtime runs an unpacked image.
    pub foreign: BTreeMap<String, Foreign>,
}

/// An image that is not ours: its unpacked root filesystem and its `ENV`.
pub struct Foreign {
    pub rootfs: PathBuf,
    pub env: Vec<(String, String)>,
}

/// `path` (absolute, in a container) resolved inside `root` as a runtime resolves a mount
/// target (runc's securejoin): a symlink in the image, absolute or not, stays inside it.
fn resolve_in_root(root: &Path, path: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut todo: Vec<String> = path.split('/').filter(|p| !p.is_empty()).rev().map(String::from).collect();
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        match part.as_str() {
            "." => continue,
            ".." => {
                parts.pop();
                continue;
            }
            _ => {}
        }
        let here = root.join(parts.join("/")).join(&part);
        match std::fs::read_link(&here) {
            Ok(target) if hops < 40 => {
                hops += 1;
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    parts.clear();
                }
                todo.extend(target.split('/').filter(|p| !p.is_empty()).rev().map(String::from));
            }
            _ => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

impl Image {
    /// This build's agentops (`bin`) and the Claude Code CLI from npm.
    pub fn local(bin: &Path) -> Self {
        let bin_dir = bin.parent().expect("bin dir").to_path_buf();
        // Claude Code as npm installed it (`.bin/claude` links into the package).
        let node_modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("node_modules");
        Self {
            dirs: vec![(bin_dir, "/opt/image/bin".into()), (node_modules, "/opt/image/node_modules".into())],
            env: vec![
                ("PATH".into(), "/opt/image/bin:/opt/image/node_modules/.bin:/usr/local/bin:/usr/bin:/bin".into()),
                ("AGENTOPS_CLAUDE_BIN".into(), "/opt/image/node_modules/.bin/claude".into()),
                ("DISABLE_AUTOUPDATER".into(), "1".into()),
            ],
            foreign: BTreeMap::new(),
        }
    }
}

/// How one container ended.
#[derive(Debug, Clone)]
pub struct Ended {
    pub name: String,
    pub init: bool,
    pub exit_code: i32,
    /// The termination log.
    pub message: String,
    pub stdout: String,
    pub stderr: String,
}

/// Whether this machine can run pods (root, mount and PID namespaces): None when it can, else why not.
pub fn available() -> Option<String> {
    let out = Command::new("unshare").args(["--mount", "--pid", "--fork", "--", "true"]).output();
    match out {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("unshare --mount --pid failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Some(format!("no unshare: {e}")),
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A Secret's data by key.
pub type SecretData = BTreeMap<String, Vec<u8>>;

/// Runs the pod of `job` (a Job as JSON). `secret` gives a Secret's data by name. `dir` holds
/// the volumes and roots.
pub fn run_pod(job: &Value, secret: &dyn Fn(&str) -> Option<SecretData>, image: &Image, dir: &Path) -> Vec<Ended> {
    let pod = &job["spec"]["template"]["spec"];
    let uid = pod["securityContext"]["runAsUser"].as_i64().expect("runAsUser");
    let gid = pod["securityContext"]["runAsGroup"].as_i64().unwrap_or(uid);
    let fs_group = pod["securityContext"]["fsGroup"].as_i64();
    // Volumes, as the kubelet lays them out.
    let mut volumes: BTreeMap<String, PathBuf> = BTreeMap::new();
    for v in pod["volumes"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().expect("volume name");
        let path = dir.join("volumes").join(name);
        std::fs::create_dir_all(&path).expect("volume dir");
        if v.get("emptyDir").is_some() || v.get("persistentVolumeClaim").is_some() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        } else if let Some(s) = v.get("secret") {
            let data = secret(s["secretName"].as_str().expect("secretName"));
            let optional = s["optional"].as_bool().unwrap_or(false);
            let data = match data {
                Some(d) => d,
                None if optional => BTreeMap::new(),
                None => panic!("the pod cannot start: Secret {} is missing", s["secretName"]),
            };
            let mode = s["defaultMode"].as_u64().unwrap_or(0o644) as u32;
            let files: Vec<(String, String)> = match s["items"].as_array() {
                Some(items) => items
                    .iter()
                    .map(|i| (i["key"].as_str().unwrap().to_string(), i["path"].as_str().unwrap().to_string()))
                    .collect(),
                None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (key, file) in files {
                let Some(value) = data.get(&key) else {
                    assert!(optional, "the pod cannot start: Secret {} has no key {key}", s["secretName"]);
                    continue;
                };
                let f = path.join(&file);
                std::fs::write(&f, value).expect("secret file");
                // A read-only volume with an fsGroup: the group may read (kubelet's ownership).
                let mode = if fs_group.is_some() { mode | 0o440 } else { mode };
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).expect("chmod");
                if let Some(g) = fs_group {
                    std::os::unix::fs::chown(&f, Some(0), Some(g as u32)).expect("chown");
                }
            }
        } else {
            panic!("a volume this kubelet does not know: {v}");
        }
        volumes.insert(name.to_string(), path);
    }
    // The image's passwd knows the runner's uid (as the image's useradd does).
    let passwd = dir.join("passwd");
    let host = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    std::fs::write(&passwd, format!("{host}agentops:x:{uid}:{gid}::/home/agentops:/bin/sh\n")).expect("passwd");

    let mut ended = Vec::new();
    let init = pod["initContainers"].as_array().cloned().unwrap_or_default();
    let main = pod["containers"].as_array().cloned().unwrap_or_default();
    // The status manager keeps the first 12 KiB ÷ (containers + init containers) bytes of each
    // message (kubelet `MaxPodTerminationMessageLogLength`): 3072 in a pod of four.
    let keep = 12 * 1024 / (init.len() + main.len()).max(1);
    for (c, is_init) in init.iter().map(|c| (c, true)).chain(main.iter().map(|c| (c, false))) {
        let mut e = run_container(c, is_init, &volumes, image, uid, gid, &passwd, dir);
        if e.message.len() > keep {
            let mut end = keep;
            while !e.message.is_char_boundary(end) {
                end -= 1;
            }
            e.message.truncate(end);
        }
        let failed = e.exit_code != 0;
        ended.push(e);
        if failed && is_init {
            break;
        }
    }
    ended
}

#[allow(clippy::too_many_arguments)]
fn run_container(
    c: &Value,
    init: bool,
    volumes: &BTreeMap<String, PathBuf>,
    image: &Image,
    uid: i64,
    gid: i64,
    passwd: &Path,
    dir: &Path,
) -> Ended {
    let name = c["name"].as_str().expect("container name").to_string();
    let root = dir.join("roots").join(&name);
    std::fs::create_dir_all(&root).expect("root");
    let term = dir.join(format!("{name}.termination-log"));
    std::fs::write(&term, "").expect("termination log");
    std::os::unix::fs::chown(&term, Some(uid as u32), Some(gid as u32)).expect("chown");
    let foreign = c["image"].as_str().and_then(|i| image.foreign.get(i));
    let mut script = String::from("set -eu\nmount --make-rprivate /\nR=\"$1\"; shift\n");
    match foreign {
        // Another distribution's root, as a runtime unpacks an image: an overlay whose upper
        // layer takes the mount points (and nothing else: the root is read-only below).
        Some(f) => {
            let (upper, work) = (dir.join("roots").join(format!("{name}.upper")), dir.join("roots").join(format!("{name}.work")));
            std::fs::create_dir_all(&upper).expect("upper");
            std::fs::create_dir_all(&work).expect("work");
            script.push_str(&format!(
                "mount -t overlay overlay -o lowerdir={},upperdir={},workdir={} \"$R\"\n",
                f.rootfs.display(),
                upper.display(),
                work.display()
            ));
        }
        None => script.push_str(
            "mount -t tmpfs -o mode=755 tmpfs \"$R\"\n\
             for d in usr etc; do mkdir \"$R/$d\"; mount --rbind \"/$d\" \"$R/$d\"; mount -o remount,bind,ro \"$R/$d\"; done\n\
             ln -s usr/bin \"$R/bin\"; ln -s usr/lib \"$R/lib\"; ln -s usr/sbin \"$R/sbin\"\n\
             if [ -e /usr/lib64 ]; then ln -s usr/lib64 \"$R/lib64\"; fi\n",
        ),
    }
    script.push_str(
        "mkdir -p \"$R/proc\"; mount -t proc proc \"$R/proc\"\n\
         mkdir -p \"$R/dev\"; mount -t tmpfs -o mode=755 tmpfs \"$R/dev\"\n\
         for n in null zero random urandom full tty; do touch \"$R/dev/$n\"; mount --bind \"/dev/$n\" \"$R/dev/$n\"; done\n",
    );
    let bind = |script: &mut String, host: &Path, at: &str, read_only: bool, file: bool| {
        let at = match foreign {
            Some(f) => resolve_in_root(&f.rootfs, at),
            None => at.to_string(),
        };
        let target = format!("\"$R\"{}", quote(&at));
        if file {
            script.push_str(&format!("[ -e {target} ] || {{ mkdir -p \"$(dirname {target})\"; touch {target}; }}\n"));
        } else {
            script.push_str(&format!("mkdir -p {target}\n"));
        }
        script.push_str(&format!("mount --bind {} {target}\n", quote(&host.display().to_string())));
        if read_only {
            script.push_str(&format!("mount -o remount,bind,ro {target}\n"));
        }
    };
    if foreign.is_none() {
        for (host, at) in &image.dirs {
            bind(&mut script, host, at, true, false);
        }
        bind(&mut script, passwd, "/etc/passwd", true, true);
    }
    bind(&mut script, &term, c["terminationMessagePath"].as_str().unwrap_or("/dev/termination-log"), false, true);
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let vol = m["name"].as_str().expect("mount name");
        let host = volumes.get(vol).unwrap_or_else(|| panic!("{name} mounts an undeclared volume {vol}"));
        bind(&mut script, host, m["mountPath"].as_str().expect("mountPath"), m["readOnly"] == json!(true), false);
    }
    if c["securityContext"]["readOnlyRootFilesystem"] == json!(true) {
        script.push_str("mount -o remount,ro \"$R\"\n");
    }
    // Only the container's env, set by the host's `env` before entering the root: the image
    // need not have one.
    script.push_str("exec /usr/bin/env -i \"$@\"\n");
    let image_env = match foreign {
        Some(f) => &f.env,
        None => &image.env,
    };
    let mut env: BTreeMap<String, String> = image_env.iter().cloned().collect();
    for e in c["env"].as_array().into_iter().flatten() {
        assert!(e.get("valueFrom").is_none(), "env from a reference: {e}");
        env.insert(e["name"].as_str().unwrap().into(), e["value"].as_str().unwrap_or_default().into());
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--pid", "--fork", "--kill-child", "--", "/bin/sh", "-c", &script, "sh"]).arg(&root);
    for (k, v) in &env {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.arg("/usr/bin/unshare").arg(format!("--root={}", root.display()));
    cmd.args(["--wd=/", "--setgid", &gid.to_string(), "--setuid", &uid.to_string(), "--"]);
    for a in c["command"].as_array().into_iter().flatten().chain(c["args"].as_array().into_iter().flatten()) {
        cmd.arg(a.as_str().unwrap());
    }
    let out = cmd.output().expect("unshare");
    Ended {
        name,
        init,
        exit_code: out.status.code().unwrap_or(128),
        // The kubelet reads the last 4096 bytes of the file (`tail.ReadAtMost`, cut anywhere);
        // `run_pod` then cuts as its status manager does.
        message: {
            let bytes = std::fs::read(&term).unwrap_or_default();
            String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(4096)..]).into_owned()
        },
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The pod's status as the kubelet reports it, and the Job's condition as the Job controller sets it.
pub fn report(kube: &super::kube_api::FakeKube, ns: &str, job: &str, ended: &[Ended]) {
    let status = |e: &Ended| {
        json!({"name": e.name, "ready": false, "restartCount": 0, "image": "agentops", "imageID": "",
               "state": {"terminated": {"exitCode": e.exit_code, "reason": if e.exit_code == 0 {"Completed"} else {"Error"},
                                          "message": (!e.message.is_empty()).then(|| e.message.clone())}}})
    };
    let init: Vec<Value> = ended.iter().filter(|e| e.init).map(status).collect();
    let main: Vec<Value> = ended.iter().filter(|e| !e.init).map(status).collect();
    kube.put(
        "api/v1",
        "pods",
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": format!("{job}-pod"), "namespace": ns, "labels": {"job-name": job}},
               "status": {"initContainerStatuses": init, "containerStatuses": main}}),
    );
    let ok = ended.last().is_some_and(|e| !e.init && e.exit_code == 0);
    let cond = if ok {
        json!({"type": "Complete", "status": "True"})
    } else {
        json!({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"})
    };
    kube.patch_status("apis/batch/v1", "jobs", ns, job, json!({"conditions": [cond]}));
}
