//! Pure parsing of `/proc/<pid>/mountinfo` and `/proc/<pid>/cgroup`, and the choice of
//! cgroup layout made from them. No I/O here, so every host shape (v1, v2, hybrid,
//! containers with a non-`/` cgroup mount root) is covered by unit tests.

use std::path::{Path, PathBuf};

use crate::CgroupVersion;

/// One line of mountinfo, reduced to what the cgroup detection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    /// The path inside the mounted filesystem that is mounted (field 4).
    pub root: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub super_options: Vec<String>,
}

/// Parses mountinfo text; malformed lines are skipped rather than failing the whole read,
/// because the kernel format grows optional fields and we only need the cgroup lines.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mount> {
    let (pre, post) = line.split_once(" - ")?;
    let pre: Vec<&str> = pre.split(' ').collect();
    if pre.len() < 6 {
        return None;
    }
    let mut post = post.split(' ');
    let fs_type = post.next()?.to_string();
    let _source = post.next()?;
    let super_options = post
        .next()
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    Some(Mount {
        root: unescape(pre[3]),
        mount_point: PathBuf::from(unescape(pre[4])),
        fs_type,
        super_options,
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = (bytes[i] == b'\\')
            .then(|| field.get(i + 1..i + 4))
            .flatten()
            .filter(|o| o.bytes().all(|b| (b'0'..=b'7').contains(&b)))
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        if let Some(v) = octal {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One v1 hierarchy we use: its mount point and the caller's own cgroup inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct V1Hierarchy {
    /// Controllers attached to this hierarchy (e.g. `["cpu", "cpuacct"]` when co-mounted).
    pub controllers: Vec<String>,
    /// Directory under which the parent cgroup is created: mount point + own cgroup path.
    pub base: PathBuf,
}

// One per host, never moved around in bulk: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Layout {
    V1 {
        memory: V1Hierarchy,
        pids: V1Hierarchy,
        cpu: V1Hierarchy,
        cpuacct: V1Hierarchy,
        freezer: Option<V1Hierarchy>,
    },
    /// The unified hierarchy mounted at `root`.
    V2 { root: PathBuf },
}

impl Layout {
    pub fn version(&self) -> CgroupVersion {
        match self {
            Layout::V1 { .. } => CgroupVersion::V1,
            Layout::V2 { .. } => CgroupVersion::V2,
        }
    }
}

/// Parses `/proc/self/cgroup` into `(controllers, path)` pairs; the v2 line has no
/// controllers (`0::/path`).
pub(crate) fn parse_self_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers = controllers
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            Some((controllers, path.to_string()))
        })
        .collect()
}

/// Decides the layout.
///
/// * A `cgroup2` filesystem mounted exactly at `cgroup_root` means a pure v2 host.
/// * Otherwise the v1 controller mounts are used (a hybrid host's `unified` mount carries
///   no controllers we need, so hybrid counts as v1). Mounts under `cgroup_root` win over
///   others for the same controller.
///
/// On v1 the parent cgroup is nested under the caller's own cgroup in each hierarchy
/// (from `self_cgroup`), so a server started inside a slice or container stays inside its
/// accounting and limits. On v2 the parent lives at the root of the hierarchy, because a
/// non-root v2 cgroup that holds processes (ours) cannot delegate controllers to children.
pub(crate) fn choose_layout(
    mounts: &[Mount],
    cgroup_root: &Path,
    self_cgroup: &str,
) -> Result<Layout, String> {
    if mounts
        .iter()
        .any(|m| m.fs_type == "cgroup2" && m.mount_point == cgroup_root)
    {
        return Ok(Layout::V2 {
            root: cgroup_root.to_path_buf(),
        });
    }
    let own = parse_self_cgroup(self_cgroup);
    let find = |controller: &str| -> Option<V1Hierarchy> {
        let mut candidates: Vec<&Mount> = mounts
            .iter()
            .filter(|m| m.fs_type == "cgroup" && m.super_options.iter().any(|o| o == controller))
            .collect();
        // Prefer the mount under the configured root; stable otherwise (first seen).
        candidates.sort_by_key(|m| !m.mount_point.starts_with(cgroup_root));
        let m = candidates.first()?;
        let controllers: Vec<String> = m
            .super_options
            .iter()
            .filter(|o| KNOWN_V1_CONTROLLERS.contains(&o.as_str()))
            .cloned()
            .collect();
        let own_path = own
            .iter()
            .find(|(cs, _)| cs.iter().any(|c| c == controller))
            .map(|(_, p)| p.as_str())
            .unwrap_or("/");
        Some(V1Hierarchy {
            controllers,
            base: join_own(&m.mount_point, &m.root, own_path),
        })
    };
    let memory = find("memory");
    let pids = find("pids");
    let cpu = find("cpu");
    let cpuacct = find("cpuacct");
    match (memory, pids, cpu, cpuacct) {
        (Some(memory), Some(pids), Some(cpu), Some(cpuacct)) => Ok(Layout::V1 {
            memory,
            pids,
            cpu,
            cpuacct,
            freezer: find("freezer"),
        }),
        (memory, pids, cpu, cpuacct) => {
            let missing: Vec<&str> = [
                ("memory", memory.is_none()),
                ("pids", pids.is_none()),
                ("cpu", cpu.is_none()),
                ("cpuacct", cpuacct.is_none()),
            ]
            .iter()
            .filter(|(_, m)| *m)
            .map(|(n, _)| *n)
            .collect();
            Err(format!(
                "no cgroup2 mount at {} and cgroup v1 controllers missing: {}",
                cgroup_root.display(),
                missing.join(", ")
            ))
        }
    }
}

const KNOWN_V1_CONTROLLERS: &[&str] = &[
    "memory",
    "pids",
    "cpu",
    "cpuacct",
    "freezer",
    "cpuset",
    "blkio",
    "devices",
    "net_cls",
    "net_prio",
    "hugetlb",
    "perf_event",
    "rdma",
    "misc",
];

/// `own_path` is relative to the hierarchy root; the mount may expose only a subtree
/// (`mount_root`), as inside containers. Paths are never allowed to climb out with `..`.
fn join_own(mount_point: &Path, mount_root: &str, own_path: &str) -> PathBuf {
    let rel = if mount_root != "/" {
        own_path.strip_prefix(mount_root).unwrap_or("")
    } else {
        own_path
    };
    let mut out = mount_point.to_path_buf();
    for comp in rel.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." {
            continue;
        }
        out.push(comp);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:33 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
";

    const HYBRID: &str = "\
25 18 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
31 25 0:28 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
32 25 0:29 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,pids
33 25 0:30 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,freezer
";

    const V2: &str = "\
24 18 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
29 21 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn parses_fields_and_unescapes_octal() {
        let m = parse_mountinfo(
            "36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n",
        );
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].root, "/mnt1");
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt two"));
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[0].super_options, vec!["rw", "errors=continue"]);
    }

    #[test]
    fn skips_malformed_lines() {
        assert!(parse_mountinfo("garbage\n1 2 3\n").is_empty());
    }

    #[test]
    fn v1_layout_nests_under_own_cgroup() {
        let self_cg = "9:name=systemd:/\n8:pids:/\n6:freezer:/\n4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n";
        let l = choose_layout(&parse_mountinfo(V1), Path::new("/sys/fs/cgroup"), self_cg)
            .expect("layout");
        let Layout::V1 {
            memory,
            pids,
            cpu,
            cpuacct,
            freezer,
        } = l
        else {
            panic!("expected v1, got {l:?}");
        };
        assert_eq!(
            memory.base,
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc")
        );
        assert_eq!(pids.base, PathBuf::from("/sys/fs/cgroup/pids"));
        assert_eq!(cpu.controllers, vec!["cpu"]);
        assert_eq!(cpuacct.base, PathBuf::from("/sys/fs/cgroup/cpuacct"));
        assert_eq!(
            freezer.map(|f| f.base),
            Some(PathBuf::from("/sys/fs/cgroup/freezer"))
        );
    }

    #[test]
    fn hybrid_is_v1_with_comounted_cpu() {
        let l = choose_layout(&parse_mountinfo(HYBRID), Path::new("/sys/fs/cgroup"), "")
            .expect("layout");
        assert_eq!(l.version(), CgroupVersion::V1);
        let Layout::V1 { cpu, cpuacct, .. } = l else {
            panic!("expected v1");
        };
        assert_eq!(cpu.base, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(cpu, cpuacct);
        assert_eq!(cpu.controllers, vec!["cpu", "cpuacct"]);
    }

    #[test]
    fn v2_when_cgroup2_is_at_root() {
        let l = choose_layout(
            &parse_mountinfo(V2),
            Path::new("/sys/fs/cgroup"),
            "0::/user.slice\n",
        )
        .expect("layout");
        assert_eq!(
            l,
            Layout::V2 {
                root: PathBuf::from("/sys/fs/cgroup")
            }
        );
    }

    #[test]
    fn v2_elsewhere_is_not_taken_for_the_root() {
        let err = choose_layout(&parse_mountinfo(V2), Path::new("/other"), "").expect_err("no v2");
        assert!(err.contains("memory"), "{err}");
    }

    #[test]
    fn container_mount_root_is_stripped_and_dotdot_ignored() {
        let text = "40 31 0:32 /docker/xyz /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let m = parse_mountinfo(text);
        assert_eq!(
            join_own(&m[0].mount_point, &m[0].root, "/docker/xyz/inner"),
            PathBuf::from("/sys/fs/cgroup/memory/inner")
        );
        assert_eq!(
            join_own(Path::new("/cg"), "/", "/../../etc"),
            PathBuf::from("/cg/etc")
        );
    }

    #[test]
    fn missing_controller_is_an_error_naming_it() {
        let text = V1.replace("rw,pids", "rw,nothing");
        let err = choose_layout(&parse_mountinfo(&text), Path::new("/sys/fs/cgroup"), "")
            .expect_err("pids missing");
        assert!(err.contains("pids"), "{err}");
    }
}
