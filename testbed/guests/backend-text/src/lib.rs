//! `text` backend component: runs a job whose workload is a small script, one command per line.
//! An example of the `backend` world of `rhizos:plugin` (and the tests' component backend).
//!
//! Commands: `say TEXT` (a stdout line), `warn TEXT` (a stderr line), `args` (each argument as
//! a line), `env NAME` (`NAME=value`), `upper` (stdin, uppercased, line by line), `count N`
//! (lines 1..=N), `spin` (loop forever: for deadline and fuel tests), `alloc MIB` (grow memory by
//! MIB MiB and touch it), `exit N` (end with code N), `reject TEXT` (refuse the job). The script
//! ends with code 0 unless it says otherwise.

wit_bindgen::generate!({
    path: "../../../plugin-api/wit",
    world: "backend",
});

use rhizos::plugin::types::PluginKind;

struct Text;

impl Guest for Text {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "textproc".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::Backend,
            backends: vec!["text".into()],
        }
    }

    fn configure(config: String) -> Result<(), String> {
        if config.trim().starts_with('{') {
            Ok(())
        } else {
            Err(format!("config must be a JSON object, got {config}"))
        }
    }

    fn run(request: ExecRequest) -> ExecEnd {
        let Ok(script) = String::from_utf8(request.workload) else {
            return ExecEnd::Rejected("the workload is not UTF-8 text".into());
        };
        let mut kept: Vec<Vec<u8>> = Vec::new();
        for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (command, rest) = line.split_once(' ').unwrap_or((line, ""));
            match command {
                "say" => log(LogStream::Stdout, rest),
                "warn" => log(LogStream::Stderr, rest),
                "args" => {
                    for arg in &request.args {
                        log(LogStream::Stdout, arg);
                    }
                }
                "env" => {
                    let value = request
                        .env
                        .iter()
                        .find(|(k, _)| k == rest)
                        .map(|(_, v)| v.as_str())
                        .unwrap_or("(unset)");
                    log(LogStream::Stdout, &format!("{rest}={value}"));
                }
                "upper" => {
                    for input in String::from_utf8_lossy(&request.stdin).lines() {
                        log(LogStream::Stdout, &input.to_uppercase());
                    }
                }
                "count" => {
                    for i in 1..=rest.parse::<u32>().unwrap_or(0) {
                        log(LogStream::Stdout, &i.to_string());
                    }
                }
                "spin" => {
                    let mut x = 0u64;
                    loop {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                }
                "alloc" => {
                    let mib = rest.parse::<usize>().unwrap_or(0);
                    for _ in 0..mib {
                        kept.push(vec![1u8; 1 << 20]);
                    }
                    log(LogStream::Stdout, &format!("allocated {mib} MiB"));
                }
                "exit" => return ExecEnd::Exited(rest.parse().unwrap_or(1)),
                "reject" => return ExecEnd::Rejected(rest.into()),
                other => return ExecEnd::Rejected(format!("unknown command {other:?}")),
            }
        }
        std::hint::black_box(&kept);
        ExecEnd::Exited(0)
    }
}

export!(Text);
