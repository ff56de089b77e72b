//! `nimbus cron ls` (function, name, schedule, time zone, next 3 fire times, last
//! fire) and `nimbus cron trigger FUNCTION NAME` (fire now, for testing).

use std::process::ExitCode;

use clap::Subcommand;
use nimbus_core::api::{CronInfo, CronTriggerResponse};

use crate::client::{Api, enc, print_json, table};
use crate::{Global, Output};

#[derive(Subcommand)]
pub enum CronCmd {
    /// List the cron triggers of deployed functions.
    Ls {
        /// Only this function's.
        function: Option<String>,
    },
    /// Fire a cron now, whatever its schedule.
    Trigger { function: String, name: String },
}

pub fn run(g: &Global, cmd: CronCmd) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    match cmd {
        CronCmd::Ls { function } => {
            let mut crons: Vec<CronInfo> = api.json(api.req(reqwest::Method::GET, "/v1/cron"))?;
            if let Some(f) = &function {
                crons.retain(|c| &c.function == f);
            }
            if g.output == Output::Json {
                print_json(&crons)?;
                return Ok(ExitCode::SUCCESS);
            }
            if crons.is_empty() {
                outln!("no cron triggers");
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = table(&[
                "function",
                "name",
                "schedule",
                "timezone",
                "next",
                "last fire",
            ]);
            for c in crons {
                let last = c
                    .last_fire
                    .map(|f| format!("{} ({})", f.scheduled_at, f.kind))
                    .unwrap_or_else(|| "-".into());
                t.add_row(vec![
                    c.function,
                    c.name,
                    c.schedule,
                    c.timezone,
                    c.next.join(", "),
                    last,
                ]);
            }
            outln!("{t}");
        }
        CronCmd::Trigger { function, name } => {
            let r: CronTriggerResponse = api.json(api.req(
                reqwest::Method::POST,
                &format!("/v1/cron/{}/{}/trigger", enc(&function), enc(&name)),
            ))?;
            if g.output == Output::Json {
                print_json(&r)?;
            } else {
                outln!(
                    "fired {}/{}: request id {}",
                    r.function,
                    r.name,
                    r.request_id
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
