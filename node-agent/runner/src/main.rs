//! edgeloom-runner: reads a JSON spec on stdin, writes JSON lines on stdout.
//! Exit 0: a result was written; 1: the task failed (reason in an error line);
//! 2: the spec is unusable.

use edgeloom_runner::protocol::{Line, Spec};
use edgeloom_runner::workloads::{self, Sink};
use std::io::{Read, Write};

struct Stdout;

impl Sink for Stdout {
    fn emit(&mut self, line: Line) {
        let mut out = std::io::stdout().lock();
        // A closed stdout means the agent is gone; nothing useful is left to do.
        if serde_json::to_writer(&mut out, &line).is_err()
            || writeln!(out).is_err()
            || out.flush().is_err()
        {
            std::process::exit(3);
        }
    }
}

/// CPU time this process used so far (every thread, user and system), in milliseconds.
fn cpu_millis() -> u64 {
    // SAFETY: getrusage writes a plain struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let ms = |t: libc::timeval| t.tv_sec.max(0) as u64 * 1000 + t.tv_usec.max(0) as u64 / 1000;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

fn main() {
    // `edgeloom-runner serve <config JSON>`: a long-lived serving process on stdin/stdout.
    if std::env::args().nth(1).as_deref() == Some("serve") {
        let cfg: Result<edgeloom_crds::serving::ServeConfig, String> = std::env::args()
            .nth(2)
            .ok_or_else(|| "usage: edgeloom-runner serve <config JSON>".to_string())
            .and_then(|a| serde_json::from_str(&a).map_err(|e| format!("serve config: {e}")));
        let result = cfg
            .and_then(|c| edgeloom_runner::serve::serve(&c, std::io::stdin(), std::io::stdout()));
        if let Err(e) = result {
            eprintln!("edgeloom-runner serve: {e}");
            std::process::exit(1);
        }
        return;
    }
    // `edgeloom-runner simulate`: the federated benchmark's edgeloom arms in one process.
    if std::env::args().nth(1).as_deref() == Some("simulate") {
        let mut input = String::new();
        let cfg: Result<edgeloom_runner::simulate::Config, String> = std::io::stdin()
            .read_to_string(&mut input)
            .map_err(|e| e.to_string())
            .and_then(|_| serde_json::from_str(&input).map_err(|e| e.to_string()));
        match cfg.map(|c| edgeloom_runner::simulate::simulate(&c).map_err(|e| e.to_string())) {
            Ok(Ok(results)) => {
                for r in results {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                }
                return;
            }
            Ok(Err(e)) | Err(e) => {
                eprintln!("simulate: {e}");
                std::process::exit(1);
            }
        }
    }
    let mut input = String::new();
    let spec: Spec = match std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_str(&input).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            Stdout.emit(Line::Error {
                message: format!("invalid spec: {e}"),
            });
            std::process::exit(2);
        }
    };
    let p = &spec.workload.parameters;
    let threads = if p.deterministic {
        1
    } else {
        spec.threads.unwrap_or(0) as i32
    };
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    let device = workloads::device(&spec);
    Stdout.emit(Line::Info {
        device: format!("{device:?}"),
        cuda: tch::Cuda::is_available(),
        threads: tch::get_num_threads(),
    });
    // libtorch reports some errors by panicking inside tch; they fail the task, not the agent.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        workloads::run(&spec, &mut Stdout)
    }));
    let message = match outcome {
        Ok(Ok(())) => {
            Stdout.emit(Line::Usage {
                cpu_millis: cpu_millis(),
            });
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "libtorch panicked".into()),
    };
    Stdout.emit(Line::Error { message });
    std::process::exit(1);
}
