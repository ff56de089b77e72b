//! One live instance: its control channel, its output pipe, and one invocation at a time.

use std::fs::File;
use std::io::Read;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::control::Control;
use nimbus_core::{FunctionError, InvokeStatus};

use crate::protocol::{self, Frame, FrameError, Kind};

pub(crate) struct Live {
    sandbox: nimbus_sandbox::Instance,
    control: Control,
    /// The stdout+stderr pipe (non-blocking), drained on a timer while an invocation
    /// runs and once after its result. Deliberately not registered with the reactor:
    /// epoll would wake a runtime thread for every line the function prints, whether
    /// or not anyone waits for it.
    output: File,
    logs: LogBuffer,
    pub last_used: Instant,
    pub invocations: u64,
    /// Open cgroup files, read and written in place on every invocation (a fresh
    /// open per read cost more than the rest of the host's per-call work).
    meter: Meter,
    /// Peak memory and CPU time of the last invocation, when the cgroup told us.
    pub last_peak_bytes: Option<u64>,
    pub last_cpu_ms: Option<f64>,
    /// The uid this instance runs as, handed back when it is dropped.
    pub uid: Option<crate::uids::UidLease>,
    /// Its last `R` frame announced results tagged with their request id: a result
    /// frame without the tag of the invocation in flight is then a protocol violation.
    tagged: bool,
    /// Its share of the host's budget, given back after `sandbox` (declared first, so
    /// dropped first) has killed it.
    pub reservation: Option<nimbus_core::capacity::Reservation>,
}

pub(crate) enum RunError {
    Timeout,
    ResultTooLarge,
    /// The instance died or spoke nonsense; the detail is for operators.
    Broken(String),
}

pub(crate) enum ReadyError {
    InitFailed(FunctionError),
    Sandbox(String),
    Run(RunError),
}

impl Live {
    pub fn new(mut sandbox: nimbus_sandbox::Instance) -> std::io::Result<Live> {
        let missing = || std::io::Error::other("instance has no control channel or output");
        let control = sandbox.take_control().ok_or_else(missing)?;
        let output = sandbox.take_output().ok_or_else(missing)?;
        let control = Control::new(control)?;
        let meter = Meter::open(&sandbox.cgroup_dirs());
        Ok(Live {
            sandbox,
            control,
            output: File::from(output),
            logs: LogBuffer::default(),
            last_used: Instant::now(),
            invocations: 0,
            meter,
            last_peak_bytes: None,
            last_cpu_ms: None,
            uid: None,
            tagged: false,
            reservation: None,
        })
    }

    pub fn id(&self) -> &str {
        self.sandbox.id()
    }

    /// The cgroup file holding the instance's current memory use (v1 or v2).
    pub fn memory_file(&self) -> Option<std::path::PathBuf> {
        self.sandbox.cgroup_dirs().into_iter().find_map(|d| {
            ["memory.usage_in_bytes", "memory.current"]
                .iter()
                .map(|f| d.join(f))
                .find(|f| f.exists())
        })
    }

    pub fn is_alive(&mut self) -> bool {
        matches!(self.sandbox.try_wait(), Ok(None))
    }

    /// Something was written to the control channel while the instance sat idle: it
    /// must not serve again (docs/runtime-protocol.md, "Result ownership").
    pub fn has_stray_frame(&self) -> bool {
        self.control.has_pending()
    }

    pub fn set_cpu_millis(&self, cpu_millis: u32) -> Result<(), String> {
        self.sandbox
            .set_cpu_millis(cpu_millis)
            .map_err(|e| e.to_string())
    }

    pub fn kill(&mut self) {
        self.sandbox.kill();
    }

    pub fn oom_killed(&self) -> bool {
        self.sandbox.oom_killed()
    }

    /// Waits (briefly) for the killed instance to exit, so its OOM state is final.
    pub async fn reap(&mut self) -> Option<String> {
        for _ in 0..100 {
            match self.sandbox.try_wait() {
                Ok(Some(status)) => return Some(status.to_string()),
                Ok(None) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(_) => return None,
            }
        }
        None
    }

    pub fn take_logs(&mut self) -> String {
        std::mem::take(&mut self.logs).finish()
    }

    /// Waits for the shim's `R` frame (handler loaded).
    pub async fn wait_ready(
        &mut self,
        limit: Duration,
        log_limit: usize,
    ) -> Result<(), ReadyError> {
        self.logs = LogBuffer::with_limit(log_limit);
        let frame = self.next_frame(limit).await.map_err(ReadyError::Run)?;
        match frame.kind {
            Kind::Ready => {
                let ready = protocol::Ready::parse(&frame.payload);
                self.tagged = ready.tagged_results;
                if !ready.tagged_results && !ready.stem {
                    return Err(ReadyError::InitFailed(untagged_instance()));
                }
                Ok(())
            }
            Kind::InitFailed => Err(ReadyError::InitFailed(parse_error(&frame.payload))),
            Kind::SandboxFailed => {
                let e = parse_error(&frame.payload);
                Err(ReadyError::Sandbox(e.error_message))
            }
            other => Err(ReadyError::Run(RunError::Broken(format!(
                "expected a ready frame, got {other:?}"
            )))),
        }
    }

    pub fn sandbox(&self) -> &nimbus_sandbox::Instance {
        &self.sandbox
    }

    /// Hands a stem cell its function (`A`) and waits until the handler is loaded.
    /// What the stem printed while it waited is not the function's: it is dropped.
    pub async fn assign(
        &mut self,
        payload: &[u8],
        limit: Duration,
        log_limit: usize,
    ) -> Result<(), ReadyError> {
        self.drain_output();
        let frame = protocol::encode(Kind::Assign, payload);
        let write = self.control.write_all(&frame);
        match tokio::time::timeout(limit, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(ReadyError::Run(RunError::Broken(format!(
                    "send assignment: {e}"
                ))));
            }
            Err(_) => return Err(ReadyError::Run(RunError::Timeout)),
        }
        self.wait_ready(limit, log_limit).await
    }

    /// Runs one invocation. `Ok` leaves the instance reusable.
    pub async fn run(
        &mut self,
        request_id: &str,
        arn: &str,
        trace: Option<&str>,
        event: &[u8],
        timeout: Duration,
        log_limit: usize,
    ) -> Result<InvokeStatus, RunError> {
        // Keep logs written during init (cold start) with this first invocation.
        if self.invocations > 0 {
            self.logs = LogBuffer::with_limit(log_limit);
        }
        let deadline_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
            + timeout.as_millis() as u64;
        let frame = protocol::invoke_frame(request_id, deadline_ms, arn, trace, event);
        self.meter.reset_peak();
        let cpu_before = self.meter.cpu_ns();
        let started = Instant::now();
        let write = async {
            self.control
                .write_all(&frame)
                .await
                .map_err(|e| RunError::Broken(format!("send invocation: {e}")))
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(r) => r?,
            Err(_) => return Err(RunError::Timeout),
        }
        let left = timeout.saturating_sub(started.elapsed());
        let frame = self.next_frame(left).await;
        self.last_peak_bytes = self.meter.peak_bytes();
        self.last_cpu_ms = match (cpu_before, self.meter.cpu_ns()) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e6),
            _ => None,
        };
        result_status(self.owned_result(frame?, request_id)?)
    }

    /// The frame as this invocation's own result, or the protocol violation it is. The
    /// detail never quotes the frame: it may be another invocation's answer.
    fn owned_result(&self, frame: Frame, request_id: &str) -> Result<Frame, RunError> {
        if !matches!(frame.kind, Kind::Success | Kind::Error) {
            return Err(RunError::Broken(format!(
                "expected a result frame, got {:?}",
                frame.kind
            )));
        }
        if !self.tagged {
            // `wait_ready` refuses such instances; a result from one is never trusted.
            return Err(RunError::Broken(
                "a result from an instance that does not tag its results".into(),
            ));
        }
        match protocol::untag(&frame.payload, request_id) {
            Some(payload) => Ok(Frame {
                kind: frame.kind,
                payload,
            }),
            None => Err(RunError::Broken(format!(
                "a {:?} frame that does not carry this invocation's request id",
                frame.kind
            ))),
        }
    }

    /// Reads the next frame while draining the output pipe every [`DRAIN_EVERY`], so a
    /// chatty function never blocks for long on a full pipe while we wait for its
    /// result. Most invocations answer before the first drain is due: they cost no
    /// wake-up for their output at all.
    async fn next_frame(&mut self, limit: Duration) -> Result<Frame, RunError> {
        let deadline = tokio::time::Instant::now() + limit;
        let frame = {
            let read = protocol::read_frame(&mut self.control);
            tokio::pin!(read);
            let mut drain =
                tokio::time::interval_at(tokio::time::Instant::now() + DRAIN_EVERY, DRAIN_EVERY);
            drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    f = &mut read => break Some(f),
                    _ = drain.tick() => drain_into(&self.output, &mut self.logs),
                    _ = tokio::time::sleep_until(deadline) => break None,
                }
            }
        };
        // The shim flushed before it wrote the frame, so all of its output is already in
        // the pipe.
        self.drain_output();
        match frame {
            None => Err(RunError::Timeout),
            Some(Ok(f)) => Ok(f),
            Some(Err(FrameError::TooLarge(_))) => Err(RunError::ResultTooLarge),
            Some(Err(e)) => Err(RunError::Broken(e.to_string())),
        }
    }

    fn drain_output(&mut self) {
        drain_into(&self.output, &mut self.logs);
    }
}

/// How often output is drained while an invocation runs: with the 1 MiB pipe the
/// sandbox asks for, a function would have to print over 200 MB/s to block on it.
const DRAIN_EVERY: Duration = Duration::from_millis(5);

/// Reads whatever the (non-blocking) output pipe holds into `logs`.
fn drain_into(file: &File, logs: &mut LogBuffer) {
    loop {
        match read_some(file, logs) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(_) => break,
        }
    }
}

/// The instance's cgroup accounting files, kept open.
struct Meter {
    /// `memory.max_usage_in_bytes` (v1, resettable: the peak is the invocation's own)
    /// or `memory.peak` (v2: the instance's peak since it started).
    peak: Option<(File, bool)>,
    /// `cpuacct.usage` (v1, ns) or `cpu.stat` (v2, `usage_usec`).
    cpu: Option<(File, bool)>,
}

impl Meter {
    fn open(dirs: &[std::path::PathBuf]) -> Meter {
        // Names first, then directories: v1's cpu controller also has a `cpu.stat`
        // (throttling counts, no usage), which must not shadow `cpuacct.usage`.
        let find = |names: &[(&str, bool)], write: bool| {
            names.iter().find_map(|(n, v1)| {
                dirs.iter().find_map(|d| {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(write && *v1)
                        .open(d.join(n))
                        .ok()
                        .map(|f| (f, *v1))
                })
            })
        };
        Meter {
            peak: find(
                &[("memory.max_usage_in_bytes", true), ("memory.peak", false)],
                true,
            ),
            cpu: find(&[("cpuacct.usage", true), ("cpu.stat", false)], false),
        }
    }

    fn read(file: &File) -> Option<String> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 512];
        let n = file.read_at(&mut buf, 0).ok()?;
        std::str::from_utf8(&buf[..n]).ok().map(str::to_string)
    }

    fn reset_peak(&self) {
        use std::os::unix::fs::FileExt;
        if let Some((f, true)) = &self.peak {
            let _ = f.write_at(b"0", 0);
        }
    }

    fn peak_bytes(&self) -> Option<u64> {
        let (f, _) = self.peak.as_ref()?;
        Self::read(f)?.trim().parse().ok()
    }

    fn cpu_ns(&self) -> Option<u64> {
        let (f, v1) = self.cpu.as_ref()?;
        let text = Self::read(f)?;
        if *v1 {
            text.trim().parse().ok()
        } else {
            text.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|us| us.saturating_mul(1000))
        }
    }
}

fn read_some(mut file: &File, logs: &mut LogBuffer) -> std::io::Result<usize> {
    let mut buf = [0u8; 16 * 1024];
    let n = file.read(&mut buf)?;
    logs.push(&buf[..n]);
    Ok(n)
}

/// What a result frame that belongs to the invocation means for its caller.
fn result_status(frame: Frame) -> Result<InvokeStatus, RunError> {
    if frame.kind == Kind::Error {
        return Ok(InvokeStatus::FunctionError(parse_error(&frame.payload)));
    }
    if frame.payload.len() > nimbus_core::MAX_PAYLOAD_BYTES {
        return Err(RunError::ResultTooLarge);
    }
    Ok(match nimbus_core::result::check_result(&frame.payload) {
        Ok(()) => InvokeStatus::Success(frame.payload),
        Err(why) => InvokeStatus::InvalidResult(why),
    })
}

/// Why an instance that cannot prove which invocation a result answers is never
/// invoked: untagged, a frame its handler writes would answer the next caller
/// (docs/runtime-protocol.md, "Result ownership").
fn untagged_instance() -> FunctionError {
    FunctionError {
        error_type: "Runtime.UntaggedResults".into(),
        error_message: "the instance's R frame must announce \"taggedResults\": true and \
            start every result frame with its invocation's request id \
            (docs/runtime-protocol.md)"
            .into(),
        stack_trace: vec![],
    }
}

fn parse_error(payload: &[u8]) -> FunctionError {
    serde_json::from_slice(payload).unwrap_or_else(|_| FunctionError {
        error_type: "Runtime.InvalidError".into(),
        error_message: String::from_utf8_lossy(&payload[..payload.len().min(1024)]).into_owned(),
        stack_trace: vec![],
    })
}

/// Output of one invocation, capped; what is past the cap is counted, not kept.
#[derive(Default)]
pub(crate) struct LogBuffer {
    data: Vec<u8>,
    limit: usize,
    dropped: u64,
}

impl LogBuffer {
    pub fn with_limit(limit: usize) -> Self {
        LogBuffer {
            data: Vec::new(),
            limit,
            dropped: 0,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        let room = self.limit.saturating_sub(self.data.len());
        let take = room.min(bytes.len());
        self.data.extend_from_slice(&bytes[..take]);
        self.dropped += (bytes.len() - take) as u64;
    }

    pub fn finish(self) -> String {
        let mut s = String::from_utf8_lossy(&self.data).into_owned();
        if self.dropped > 0 {
            if !s.ends_with('\n') && !s.is_empty() {
                s.push('\n');
            }
            s.push_str(&format!(
                "[nimbus: output truncated at {} bytes; {} more bytes dropped]\n",
                self.limit, self.dropped
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::{Frame, Kind, LogBuffer, result_status};
    use nimbus_core::InvokeStatus;
    use nimbus_core::result::InvalidResult;

    fn success(payload: impl Into<bytes::Bytes>) -> InvokeStatus {
        let frame = Frame {
            kind: Kind::Success,
            payload: payload.into(),
        };
        result_status(frame).unwrap_or(InvokeStatus::ResultTooLarge)
    }

    #[test]
    fn an_undecodable_result_is_never_a_success() {
        assert!(success(&b"{\"ok\":true}"[..]).is_success());
        assert_eq!(
            success(&b"\"\xff\""[..]),
            InvokeStatus::InvalidResult(InvalidResult::DecodeUtf8 { at: 1 })
        );
        let deep = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(matches!(
            success(deep),
            InvokeStatus::InvalidResult(InvalidResult::Nesting { .. })
        ));
        assert!(matches!(
            success(&b"{not json"[..]),
            InvokeStatus::InvalidResult(InvalidResult::ParseJson(_))
        ));
    }

    #[test]
    fn log_buffer_caps_and_marks_truncation() {
        let mut b = LogBuffer::with_limit(10);
        b.push(b"12345");
        b.push(b"6789012345");
        let s = b.finish();
        assert!(
            s.starts_with("1234567890\n[nimbus: output truncated at 10 bytes; 5 more"),
            "{s}"
        );
        let mut b = LogBuffer::with_limit(10);
        b.push(b"ok\n");
        assert_eq!(b.finish(), "ok\n");
    }
}
