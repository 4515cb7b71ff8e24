//! Shell completions and man pages.
use crate::common::*;

const SUBCOMMANDS: [&str; 6] = [
    "add-user",
    "rotate",
    "revoke",
    "remove-user",
    "fetch",
    "man",
];

#[test]
fn completions_are_valid_scripts_naming_the_subcommands() {
    let s = Scratch::new();
    let bash = ok(&s.rotator(&["completions", "bash"]));
    let path = s.write("rotator.bash", &bash);
    let check = run("bash", &["-n", path.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "bash -n refuses the completion script: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(bash.contains("complete -F"), "{bash}");
    for shell in ["zsh", "fish"] {
        let script = ok(&s.rotator(&["completions", shell]));
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell} completions lack {sub}");
        }
    }
    for sub in SUBCOMMANDS {
        assert!(bash.contains(sub), "bash completions lack {sub}");
    }
    // The options of a subcommand too: --from belongs to add-user.
    assert!(
        bash.contains("--from"),
        "bash completions lack add-user --from"
    );
    fails_with(&s.rotator(&["completions", "tcsh"]), 2);
}

#[test]
fn man_pages_are_roff_with_every_subcommand() {
    let s = Scratch::new();
    let page = ok(&s.rotator(&["man"]));
    assert!(page.contains(".TH rotator 1"), "{page}");
    for sub in SUBCOMMANDS {
        // roff escapes the hyphens: rotator\-add\-user(1).
        let roff = format!("rotator\\-{}(1)", sub.replace('-', "\\-"));
        assert!(page.contains(&roff), "rotator.1 does not name {roff}");
    }
    ok(&s.rotator(&["man", "--dir", "man1"]));
    for sub in SUBCOMMANDS {
        let p = s.path(&format!("man1/rotator-{sub}.1"));
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(text.contains(".TH"), "{}", p.display());
    }
    let add = std::fs::read_to_string(s.path("man1/rotator-add-user.1")).unwrap();
    assert!(add.contains("cluster\\-wide"), "{add}");
    // Rendered by a real roff formatter when the machine has one.
    let groff = std::process::Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(s.path("man1/rotator.1"))
        .output();
    match groff {
        Ok(o) => {
            assert!(o.status.success(), "groff: {o:?}");
            let warnings = String::from_utf8_lossy(&o.stderr);
            assert!(warnings.trim().is_empty(), "groff warns: {warnings}");
        }
        Err(e) => eprintln!(
            "\n!!! SKIPPED the groff rendering check: groff is not installed ({e}); the roff text itself was checked\n"
        ),
    }
}
