//! The real `tagway` binary colours its text logs only on a terminal: stderr redirected to a file
//! gets plain text, a pseudo-terminal gets ANSI colours, and `NO_COLOR` turns them off there too.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tagway_integration::e2e::{free_port, tagway_bin};

const ESC: &str = "\x1b[";

/// A static configuration with one entry point and an empty file provider, in `dir`.
fn config(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let port = free_port()?;
    std::fs::write(dir.join("dynamic.toml"), "")?;
    let st = dir.join("static.toml");
    std::fs::write(
        &st,
        format!(
            "[entryPoints.tcp]\naddress = \"127.0.0.1:{port}\"\n\
             [providers.file]\nfilename = \"dynamic.toml\"\n"
        ),
    )?;
    Ok(st)
}

/// Starts `tagway run` with `stderr` and the extra environment; `NO_COLOR` is removed unless
/// given.
fn spawn(st: &std::path::Path, stderr: Stdio, env: &[(&str, &str)]) -> Result<Child> {
    let mut cmd = Command::new(tagway_bin()?);
    cmd.args(["run", "--config"])
        .arg(st)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().context("starting tagway")
}

/// Waits (at most 10 s) until `read()` contains the entry point's `listening` line, then stops
/// the process (by its PID) and returns everything it wrote.
fn until_listening(mut child: Child, read: impl Fn() -> Result<String>) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = read()?;
        if text.contains("listening") && text.contains("entry_point") {
            break text;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("tagway did not log `listening` within 10 s; stderr:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill()?;
    child.wait()?;
    Ok(text)
}

#[test]
fn logs_to_a_file_carry_no_ansi_colours() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let st = config(dir.path())?;
    let log_path = dir.path().join("tagway.log");
    let child = spawn(&st, Stdio::from(File::create(&log_path)?), &[])?;
    let text = until_listening(child, || Ok(std::fs::read_to_string(&log_path)?))?;
    assert!(text.contains("INFO"), "{text}");
    assert!(
        !text.contains(ESC),
        "ANSI escape in a log file: {:?}",
        text.lines().find(|l| l.contains(ESC))
    );
    Ok(())
}

/// A pseudo-terminal: (master, slave) file handles.
fn open_pty() -> Result<(File, File)> {
    // SAFETY: plain libc calls on a descriptor this function owns; ptsname_r writes at most
    // `buf.len()` bytes, NUL-terminated on success.
    unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if fd < 0 {
            bail!("posix_openpt: {}", std::io::Error::last_os_error());
        }
        let master = File::from(OwnedFd::from_raw_fd(fd));
        if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
            bail!("grantpt/unlockpt: {}", std::io::Error::last_os_error());
        }
        let mut buf = [0 as libc::c_char; 128];
        if libc::ptsname_r(fd, buf.as_mut_ptr(), buf.len()) != 0 {
            bail!("ptsname_r: {}", std::io::Error::last_os_error());
        }
        let name = std::ffi::CStr::from_ptr(buf.as_ptr()).to_str()?.to_owned();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&name)
            .with_context(|| format!("opening {name}"))?;
        Ok((master, slave))
    }
}

/// Runs tagway with stderr on a pseudo-terminal and returns what it wrote there.
fn run_on_terminal(env: &[(&str, &str)]) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let st = config(dir.path())?;
    let (mut master, slave) = open_pty()?;
    // The only copy of the slave side goes to the child: once it exits, reading the master
    // ends (EIO), which ends the reader thread.
    let child = spawn(&st, Stdio::from(slave), env)?;
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = out.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&buf[..n]);
        }
    });
    let text = until_listening(child, || {
        Ok(String::from_utf8_lossy(&out.lock().unwrap_or_else(|e| e.into_inner())).into_owned())
    })?;
    reader.join().ok();
    Ok(text)
}

#[test]
fn a_terminal_gets_colours_unless_no_color_is_set() -> Result<()> {
    let coloured = run_on_terminal(&[])?;
    assert!(
        coloured.contains(ESC),
        "no colours on a terminal: {coloured}"
    );
    let plain = run_on_terminal(&[("NO_COLOR", "1")])?;
    assert!(plain.contains("INFO"), "{plain}");
    assert!(
        !plain.contains(ESC),
        "ANSI escape on a terminal with NO_COLOR set: {:?}",
        plain.lines().find(|l| l.contains(ESC))
    );
    Ok(())
}
