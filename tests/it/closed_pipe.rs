//! Commands that print a lot end quietly when their reader goes away
//! (`rotator audit log --output json | head`): no panic, no backtrace, no
//! error, exit 0 or 141.
use std::io::Read;
use std::process::Stdio;

use crate::common::*;

#[test]
fn printing_commands_end_quietly_when_their_reader_closes_early() {
    let s = Scratch::new();
    let mut csv = String::from("name,namespaces,role\n");
    for i in 0..150 {
        csv.push_str(&format!("user{i:03},team-a,view\n"));
    }
    s.write("users.csv", &csv);
    ok(&s.rotator(&["add-user", "--from", "users.csv", "--out-dir", "out"]));
    let commands: &[&[&str]] = &[
        &["--output", "json", "audit", "log", "--limit", "100000"],
        &["audit", "log", "--limit", "100000"],
        &["list-users"],
        &["--output", "json", "list-users"],
        &["audit", "export"],
        &["completions", "bash"],
    ];
    for args in commands {
        // The reader gone before the first write, and after the first line
        // (`head -1`): what is left to write meets a closed pipe.
        for first_line in [false, true] {
            let mut child = s
                .command()
                .args(*args)
                .env("RUST_BACKTRACE", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdout = child.stdout.take().unwrap();
            if first_line {
                let mut b = [0u8; 1];
                while stdout.read(&mut b).unwrap() == 1 && b[0] != b'\n' {}
            }
            drop(stdout);
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            let what = format!("{args:?} (first line read: {first_line})");
            assert!(
                matches!(out.status.code(), Some(0) | Some(141)),
                "{what}: {:?}\n{stderr}",
                out.status
            );
            assert!(
                !stderr.contains("panicked")
                    && !stderr.contains("backtrace")
                    && !stderr.to_lowercase().contains("broken pipe")
                    && !stderr.contains("error"),
                "{what}: {stderr}"
            );
        }
    }
}
