//! What a person or a script sees: JSON events on stdout with `--json`, plain lines on
//! stderr otherwise, with progress redrawn in place when stderr is a terminal. The text of
//! the progress lines is in [`crate::progress`]; the events are [`crate::events::Event`].

use std::sync::Mutex;

use crate::events::Event;

/// How events are shown: JSON lines on stdout, or plain lines on stderr, with progress
/// redrawn in place when stderr is a terminal.
#[derive(Clone)]
pub struct Output {
    /// Events are for a program (JSON lines, or the typed stream of `sink`), not a person.
    pub json: bool,
    /// Progress is redrawn in place on stderr (a terminal, no `--json`).
    live: bool,
    /// Library use ([`crate::api`]): every event goes here as a value; nothing is printed.
    sink: Option<tokio::sync::mpsc::UnboundedSender<Event>>,
}

/// What is drawn at the foot of the terminal: the progress lines, which every other
/// line printed to stderr (events, and log records through [`LogWriter`]) must first
/// erase and then draw again below itself. Otherwise a warning printed between two
/// redraws is erased by the next one, and the progress lines it pushed up stay behind.
static SCREEN: Mutex<Screen> = Mutex::new(Screen::new());

impl Output {
    pub fn new(json: bool) -> Self {
        use std::io::IsTerminal;
        Self {
            json,
            live: !json && std::io::stderr().is_terminal(),
            sink: None,
        }
    }

    /// Events as typed values on the returned receiver, nothing printed.
    pub fn stream() -> (Self, tokio::sync::mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let out = Self {
            json: true,
            live: false,
            sink: Some(tx),
        };
        (out, rx)
    }

    /// Whether `event` went to the stream (then it is not printed).
    fn streamed(&self, event: &Event) -> bool {
        match &self.sink {
            Some(tx) => {
                // A reader that went away wants no more events; the transfer goes on.
                let _ = tx.send(event.clone());
                true
            }
            None => false,
        }
    }

    /// An event only JSON readers care about (nothing in plain mode).
    pub fn json_only(&self, event: &Event) {
        if self.streamed(event) {
            return;
        }
        if self.json {
            println!("{}", event.to_line());
        }
    }

    /// Progress redraws in place (a terminal) rather than printing plain lines.
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// An event: its JSON line, or the line `plain` makes. Live progress is redrawn
    /// below it.
    pub fn event(&self, event: &Event, plain: impl FnOnce() -> String) {
        if self.streamed(event) {
            return;
        }
        if self.json {
            println!("{}", event.to_line());
        } else {
            // An event that ends the progress: its lines go rather than stay under it at
            // their last figures.
            let ends = matches!(event, Event::Complete { .. } | Event::SwarmDone(_));
            print_on_screen(&format!("{}\n", plain()), ends);
        }
    }

    /// A `progress` event: its JSON line, or `lines` (drawn over the previous ones at a
    /// terminal, printed one after the other otherwise).
    pub fn progress(&self, event: &Event, lines: &[String]) {
        if self.streamed(event) {
            return;
        }
        if self.json {
            println!("{}", event.to_line());
        } else if self.live {
            let text = lock(&SCREEN).draw(lines);
            eprint!("{text}");
        } else {
            let mut text = String::new();
            push_lines(&mut text, lines);
            eprint!("{text}");
        }
    }
}

/// Prints `text` (whole lines) on stderr above the progress lines, if any are drawn.
fn print_above_progress(text: &str) {
    print_on_screen(text, false)
}

/// Prints `text` (whole lines) on stderr where the progress lines are, then draws them
/// again below it, or (`ends_progress`) no more.
fn print_on_screen(text: &str, ends_progress: bool) {
    let mut screen = lock(&SCREEN);
    let out = if ends_progress {
        screen.end_with(text)
    } else {
        screen.print_above(text)
    };
    // One write while the lock is held: nothing else can land between erasing and redrawing.
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), out.as_bytes());
}

fn lock(screen: &Mutex<Screen>) -> std::sync::MutexGuard<'_, Screen> {
    // A panic while drawing leaves nothing half-done that matters: keep drawing.
    screen.lock().unwrap_or_else(|e| e.into_inner())
}

/// The progress area at the foot of a terminal, and the bytes that keep it there.
#[derive(Debug, Default)]
struct Screen {
    /// The progress lines drawn last (none: nothing is drawn).
    lines: Vec<String>,
}

impl Screen {
    const fn new() -> Self {
        Self { lines: Vec::new() }
    }

    /// Bytes that replace the drawn progress lines with `lines`.
    fn draw(&mut self, lines: &[String]) -> String {
        let mut out = erase_lines(self.lines.len());
        push_lines(&mut out, lines);
        self.lines = lines.to_vec();
        out
    }

    /// Bytes that print `text` where the progress lines are, which are drawn no more.
    fn end_with(&mut self, text: &str) -> String {
        let mut out = erase_lines(self.lines.len());
        out.push_str(text);
        self.lines.clear();
        out
    }

    /// Bytes that print `text` where the progress lines are, then draw them again below it.
    fn print_above(&mut self, text: &str) -> String {
        if self.lines.is_empty() {
            return text.to_string();
        }
        let mut out = erase_lines(self.lines.len());
        out.push_str(text);
        if !text.ends_with('\n') {
            out.push('\n');
        }
        push_lines(&mut out, &self.lines);
        out
    }
}

/// Appends each of `lines` with its newline.
fn push_lines(out: &mut String, lines: &[String]) {
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
}

/// Where `tracing` writes its records: stderr, above the live progress lines (see
/// [`SCREEN`]). Give it to `tracing_subscriber::fmt().with_writer`.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The fmt layer writes each record whole, in one call.
        print_above_progress(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter
    }
}

/// Terminal codes that move to the start of the `n` lines drawn last and clear from there
/// to the end of the screen.
fn erase_lines(n: usize) -> String {
    if n > 0 {
        format!("\x1b[{n}F\x1b[J")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines a terminal shows after `bytes`: text, newlines, and the two codes
    /// [`erase_lines`] uses (`ESC [ n F`: up n lines to column 0; `ESC [ J`: clear below).
    fn terminal(bytes: &str) -> Vec<String> {
        let mut rows: Vec<String> = vec![String::new()];
        let mut row = 0;
        let mut rest = bytes;
        while let Some(ch) = rest.chars().next() {
            if let Some(code) = rest.strip_prefix("\x1b[") {
                let end = code.find(|c: char| c.is_ascii_alphabetic()).unwrap();
                let n: usize = code[..end].parse().unwrap_or(1);
                match &code[end..end + 1] {
                    "F" => {
                        row -= n;
                        rows[row].clear();
                    }
                    "J" => rows.truncate(row + 1),
                    other => panic!("unexpected code {other}"),
                }
                rest = &code[end + 1..];
                continue;
            }
            if ch == '\n' {
                row += 1;
                if rows.len() <= row {
                    rows.push(String::new());
                }
            } else {
                rows[row].push(ch);
            }
            rest = &rest[ch.len_utf8()..];
        }
        rows.retain(|r| !r.is_empty());
        rows
    }

    #[test]
    fn a_log_line_between_redraws_stays_and_no_stale_progress_is_left() {
        let mut screen = Screen::new();
        let lines = |s: &str| vec![format!("{s} 1 of 2"), format!("{s} 2 of 2")];
        let mut shown = String::new();
        shown += &screen.print_above("starting\n");
        shown += &screen.draw(&lines("10%"));
        shown += &screen.print_above("WARN peer 10.0.0.3 sent a corrupt chunk\n");
        shown += &screen.draw(&lines("20%"));
        shown += &screen.print_above("WARN no newline at the end");
        shown += &screen.draw(&lines("30%"));
        assert_eq!(
            terminal(&shown),
            vec![
                "starting",
                "WARN peer 10.0.0.3 sent a corrupt chunk",
                "WARN no newline at the end",
                "30% 1 of 2",
                "30% 2 of 2",
            ]
        );
    }

    #[test]
    fn the_progress_lines_go_when_the_transfer_ends() {
        let mut screen = Screen::new();
        let mut shown = screen.draw(&["75% 1 of 2".into(), "75% 2 of 2".into()]);
        shown += &screen.end_with("complete: 8 MiB verified\n");
        shown += &screen.print_above("swarm done\n");
        assert_eq!(
            terminal(&shown),
            vec!["complete: 8 MiB verified", "swarm done"]
        );
    }

    #[test]
    fn without_progress_drawn_lines_are_printed_as_they_are() {
        let mut screen = Screen::new();
        assert_eq!(screen.print_above("a line\n"), "a line\n");
        assert_eq!(screen.draw(&[]), "");
    }
}
