//! Pid 1 of an instance reaps orphans and passes the program's status and signals
//! through; `suspend` stops everything in an instance and `resume` lets it run again
//! (issue 25, items 3 and 4). Real sandboxes, as root.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nimbus_sandbox::{Host, Instance, InstanceSpec, Isolation, Limits};

mod common;
use common::*;

fn host(name: &str) -> Host {
    common::host("reaper", name)
}

fn spec(id: &str, program: &str, args: &[&str]) -> InstanceSpec {
    let mut limits = Limits::for_memory(128);
    limits.cpu_millis = 1000;
    InstanceSpec {
        id: id.to_string(),
        program: PathBuf::from(program),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        workdir: PathBuf::from("/"),
        limits,
        isolation: Isolation::default(),
    }
}

fn finish(inst: &mut Instance) -> (std::process::ExitStatus, String) {
    let out = inst.take_output().expect("output");
    let status = wait_timeout(inst, Duration::from_secs(60));
    (status, read_output(&out, Duration::from_secs(5)))
}

/// Python never waits for children it did not start: with it as pid 1, the orphans
/// below stayed zombies and the 32 pids ran out long before 100 rounds.
#[test]
fn orphans_of_a_non_reaping_program_are_reaped() {
    let h = host("orphans");
    let script = "import os, subprocess, time\n\
                  for i in range(100):\n    \
                      subprocess.run(['/bin/sh', '-c', 'sleep 0.01 &'], check=True)\n\
                  time.sleep(0.2)\n\
                  z = 0\n\
                  for p in filter(str.isdigit, os.listdir('/proc')):\n    \
                      z += open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[0] == 'Z'\n\
                  print(f'pid={os.getpid()} zombies={z} done')\n";
    let mut s = spec("orphans", &python().0, &["-c", script]);
    // Room for a few sleeps still running on a loaded machine; far below 100 zombies.
    s.limits.pids_max = 32;
    let mut i = h.spawn(&s).expect("spawn");
    let (status, out) = finish(&mut i);
    assert!(status.success(), "{status:?} {out}");
    // The program is pid 2: pid 1 is the reaper.
    assert!(out.contains("pid=2 zombies=0 done"), "{out}");
}

#[test]
fn the_programs_exit_status_and_death_signal_pass_through() {
    let h = host("status");
    let mut i = h
        .spawn(&spec("exit7", "/bin/sh", &["-c", "exit 7"]))
        .expect("spawn");
    assert_eq!(finish(&mut i).0.code(), Some(7));
    let mut i = h
        .spawn(&spec("killed", "/bin/sh", &["-c", "kill -KILL $$"]))
        .expect("spawn");
    assert_eq!(finish(&mut i).0.code(), Some(128 + 9));
}

/// The host's SIGTERM goes to init, from init to pid 1, from pid 1 to the program.
#[test]
fn sigterm_reaches_the_program() {
    let h = host("term");
    let mut i = h
        .spawn(&spec(
            "term",
            "/bin/sh",
            &[
                "-c",
                "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.05; done",
            ],
        ))
        .expect("spawn");
    let out = i.take_output().expect("output");
    let seen = read_until(&out, "ready", Duration::from_secs(10));
    assert!(seen.contains("ready"), "{seen}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal init");
    let status = wait_timeout(&mut i, Duration::from_secs(10));
    let rest = read_output(&out, Duration::from_secs(2));
    assert_eq!(status.code(), Some(3), "{rest}");
    assert!(rest.contains("got-term"), "{rest}");
}

/// utime + stime of every pid, in clock ticks.
fn ticks(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let f: Vec<String> = s
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .map(str::to_string)
                .collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

#[test]
fn a_suspended_instance_runs_nothing_until_resumed_and_still_dies() {
    let h = host("suspend");
    let mut i = h
        .spawn(&spec(
            "suspend",
            "/bin/sh",
            &[
                "-c",
                "(trap '' TERM; while :; do :; done) & echo ready; wait",
            ],
        ))
        .expect("spawn");
    let out = i.take_output().expect("output");
    let seen = read_until(&out, "ready", Duration::from_secs(10));
    assert!(seen.contains("ready"), "{seen}");
    let pids = pids_in(&i.cgroup_dirs());

    i.suspend().expect("suspend");
    std::thread::sleep(Duration::from_millis(200));
    let t0 = ticks(&pids);
    std::thread::sleep(Duration::from_secs(1));
    let frozen = ticks(&pids) - t0;
    assert!(frozen <= 1, "{frozen} ticks while suspended");

    i.resume().expect("resume");
    let t0 = ticks(&pids);
    std::thread::sleep(Duration::from_secs(1));
    let running = ticks(&pids) - t0;
    assert!(running >= 10, "only {running} ticks once resumed");

    // Killing (and dropping) a suspended instance takes everything down.
    i.suspend().expect("suspend again");
    std::thread::sleep(Duration::from_millis(100));
    let dirs = i.cgroup_dirs();
    let started = Instant::now();
    drop(i);
    assert!(started.elapsed() < Duration::from_secs(3));
    for p in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists(),
            "{p} survived"
        );
    }
    for d in dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}
