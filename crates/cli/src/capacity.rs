//! The host's budget for sandboxed instances (`serve --max-instances`,
//! `--max-instance-memory`, by default a share of this machine), and `nimbus status`.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use nimbus_core::capacity::Budget;

use crate::client::{Api, print_json, table};
use crate::{Global, Output};

/// Instances per core by default: most instances idle between calls, and this keeps a
/// burst of cold starts from burying the host (1,000 of them made a load of 71).
const INSTANCES_PER_CORE: u64 = 32;

#[derive(Args, Clone)]
pub struct CapacityArgs {
    /// Sandboxed instances that may run at once, over all functions [default: 32 per
    /// core].
    #[arg(long, env = "NIMBUS_MAX_INSTANCES")]
    pub max_instances: Option<u64>,
    /// Memory (MB) the instances' `memory_mb` limits may add up to [default: 3/4 of the
    /// host's memory, or of nimbus's own cgroup limit when lower].
    #[arg(long, value_name = "MB", env = "NIMBUS_MAX_INSTANCE_MEMORY")]
    pub max_instance_memory: Option<u64>,
}

/// The budget from the flags, or from what this machine has.
pub fn budget(args: &CapacityArgs) -> Budget {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let memory_mb = || {
        let host = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| mem_total_bytes(&t));
        let cgroup = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|t| cgroup_limit_bytes(Path::new("/sys/fs/cgroup"), &t));
        let bytes = [host, cgroup]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(1 << 30);
        (bytes / 4 * 3) >> 20
    };
    Budget {
        max_instances: args
            .max_instances
            .unwrap_or(cores * INSTANCES_PER_CORE)
            .max(1),
        max_memory_mb: args.max_instance_memory.unwrap_or_else(memory_mb).max(1),
    }
}

/// The budget, logged once, shared by the worker (reserves) and control (checks).
pub fn shared(args: &CapacityArgs) -> std::sync::Arc<nimbus_core::capacity::Capacity> {
    let b = budget(args);
    tracing::info!(
        max_instances = b.max_instances,
        max_memory_mb = b.max_memory_mb,
        "instance budget"
    );
    nimbus_core::capacity::Capacity::new(b)
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let kib = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kib: u64 = kib.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// The lowest memory limit on this process's cgroup or its ancestors (v2 `memory.max`,
/// v1 `memory.limit_in_bytes`); `None` when unlimited or unknown.
fn cgroup_limit_bytes(root: &Path, self_cgroup: &str) -> Option<u64> {
    let (dir, file) = self_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            Some((root.join("memory").join(path), "memory.limit_in_bytes"))
        } else if id == "0" && controllers.is_empty() {
            Some((root.join(path), "memory.max"))
        } else {
            None
        }
    })?;
    dir.ancestors()
        .take_while(|d| d.starts_with(root))
        .filter_map(|d| std::fs::read_to_string(d.join(file)).ok())
        // v1 says "unlimited" with a huge page-rounded number, v2 with "max".
        .filter_map(|t| t.trim().parse::<u64>().ok())
        .filter(|b| *b < 1 << 60)
        .min()
}

/// `nimbus status`: the server's budget, what is in use and what floors ask for.
pub fn status(g: &Global) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let v: serde_json::Value = api.json(api.req(reqwest::Method::GET, "/v1/status"))?;
    if g.output == Output::Json {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let n = |section: &str, key: &str| v[section][key].as_u64().unwrap_or(0).to_string();
    let mut t = table(&["", "instances", "memory (MB)"]);
    t.add_row(vec![
        "budget".into(),
        n("budget", "max_instances"),
        n("budget", "max_memory_mb"),
    ]);
    t.add_row(vec![
        "in use".into(),
        n("usage", "instances"),
        n("usage", "memory_mb"),
    ]);
    t.add_row(vec![
        "min_instances floor".into(),
        n("floor", "instances"),
        n("floor", "memory_mb"),
    ]);
    println!("{t}");
    if v["storage_full"] == true {
        println!("storage: FULL (writes answer 507 until space is freed)");
    } else {
        println!("storage: ok");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_parses_kib() {
        let t = "MemTotal:       24683772 kB\nMemFree:  1 kB\n";
        assert_eq!(mem_total_bytes(t), Some(24_683_772 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn cgroup_limits_take_the_lowest_ancestor_and_skip_unlimited() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::fs::write(root.join("a/memory.max"), "1073741824\n").expect("w");
        std::fs::write(root.join("a/b/memory.max"), "max\n").expect("w");
        assert_eq!(cgroup_limit_bytes(root, "0::/a/b\n"), Some(1 << 30));
        std::fs::create_dir_all(root.join("memory/x")).expect("mkdir");
        std::fs::write(
            root.join("memory/x/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .expect("w");
        assert_eq!(cgroup_limit_bytes(root, "5:memory:/x\n"), None);
        std::fs::write(root.join("memory/memory.limit_in_bytes"), "2147483648").expect("w");
        assert_eq!(cgroup_limit_bytes(root, "5:memory:/x\n"), Some(2 << 30));
    }

    #[test]
    fn flags_win_over_the_host() {
        let b = budget(&CapacityArgs {
            max_instances: Some(2),
            max_instance_memory: Some(512),
        });
        assert_eq!((b.max_instances, b.max_memory_mb), (2, 512));
        let d = budget(&CapacityArgs {
            max_instances: None,
            max_instance_memory: None,
        });
        assert!(
            d.max_instances >= INSTANCES_PER_CORE && d.max_memory_mb > 0,
            "{d:?}"
        );
    }
}
