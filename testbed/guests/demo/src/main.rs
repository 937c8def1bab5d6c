//! The RhizOS demo job. With no arguments it greets, reports its progress line by line (so the
//! log streaming shows), and exits 0. Other commands exercise what the tests check:
//!
//! ```text
//! rhizos-demo [hello [NAME]]        greeting, 5 progress lines 100 ms apart, stdin summary
//! rhizos-demo count N [DELAY_MS]    prints "line 1" .. "line N", DELAY_MS apart (default 0)
//! rhizos-demo blank N               prints N empty lines as fast as it can (a log flood)
//! rhizos-demo fill MIB              writes MIB MiB into /output/fill.bin (a disk flood)
//! rhizos-demo exit CODE             writes to stderr and exits with CODE
//! rhizos-demo trap                  executes `unreachable` (a WASM trap)
//! rhizos-demo spin                  loops forever in guest code
//! rhizos-demo sleep MS              sleeps in a host call
//! rhizos-demo alloc MIB             allocates and touches MIB MiB
//! rhizos-demo env NAME              prints the variable NAME
//! rhizos-demo cat                   copies stdin to stdout
//! rhizos-demo upper IN OUT [MS]     /input/IN upper-cased into /output/OUT (+ OUT.lines: its count), then MS ms more
//! rhizos-demo write-input NAME      tries to write /input/NAME (read-only: reports the error)
//! ```
use std::io::{Read, Write};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let number = |i: usize, default: u64| arg(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    match arg(0).unwrap_or("hello") {
        "hello" => hello(arg(1)),
        "count" => {
            let delay = Duration::from_millis(number(2, 0));
            for i in 1..=number(1, 10) {
                println!("line {i}");
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
            }
        }
        "blank" => {
            let mut out = std::io::stdout().lock();
            for _ in 0..number(1, 1_000_000) {
                let _ = out.write_all(b"\n");
            }
        }
        "fill" => {
            let chunk = vec![b'x'; 1 << 20];
            let mut file = std::fs::File::create("/output/fill.bin").expect("/output is writable");
            for written in 1..=number(1, 1024) {
                if let Err(e) = file.write_all(&chunk) {
                    eprintln!("write failed after {written} MiB: {e}");
                    std::process::exit(6);
                }
            }
            println!("filled");
        }
        "exit" => {
            let code = number(1, 1) as i32;
            eprintln!("exiting with code {code} as asked");
            std::process::exit(code);
        }
        "trap" => {
            println!("about to trap");
            trap();
        }
        "spin" => {
            println!("spinning");
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "sleep" => {
            std::thread::sleep(Duration::from_millis(number(1, 1000)));
            println!("slept");
        }
        "alloc" => {
            let mib = number(1, 64) as usize;
            println!("allocating {mib} MiB");
            let mut block = vec![0u8; mib << 20];
            for page in block.chunks_mut(4096) {
                page[0] = 1;
            }
            println!("allocated {} bytes", std::hint::black_box(&block).len());
        }
        "env" => println!("{}", std::env::var(arg(1).unwrap_or("NAME")).unwrap_or_default()),
        "upper" => {
            let (from, to) = (arg(1).unwrap_or("in.txt"), arg(2).unwrap_or("out.txt"));
            let text = match std::fs::read_to_string(format!("/input/{from}")) {
                Ok(text) => text,
                Err(e) => {
                    eprintln!("cannot read /input/{from}: {e}");
                    std::process::exit(4);
                }
            };
            let out = format!("/output/{to}");
            if let Some(parent) = std::path::Path::new(&out).parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            std::fs::write(&out, text.to_uppercase()).expect("/output is writable");
            std::fs::write(format!("{out}.lines"), text.lines().count().to_string()).expect("/output is writable");
            // Optionally take this long more (steps that must overlap in time).
            std::thread::sleep(Duration::from_millis(number(3, 0)));
            println!("wrote {out}");
        }
        "write-input" => match std::fs::write(format!("/input/{}", arg(1).unwrap_or("x")), "no") {
            Ok(()) => println!("wrote into /input"),
            Err(e) => {
                println!("refused: {e}");
                std::process::exit(5);
            }
        },
        "cat" => {
            let mut input = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut input);
            let _ = std::io::stdout().write_all(&input);
        }
        other => {
            eprintln!("unknown command {other:?}; see the source for the list");
            std::process::exit(2);
        }
    }
}

fn hello(name: Option<&str>) {
    let name = name.map(str::to_owned).or_else(|| std::env::var("NAME").ok()).unwrap_or_else(|| "world".into());
    println!("Hello from RhizOS, {name}!");
    for step in 1..=5 {
        std::thread::sleep(Duration::from_millis(100));
        println!("working... step {step}/5");
    }
    let mut input = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut input);
    if !input.is_empty() {
        println!("read {} bytes of stdin", input.len());
    }
    println!("done");
}

#[cfg(target_arch = "wasm32")]
fn trap() -> ! {
    core::arch::wasm32::unreachable()
}

#[cfg(not(target_arch = "wasm32"))]
fn trap() -> ! {
    std::process::abort()
}
