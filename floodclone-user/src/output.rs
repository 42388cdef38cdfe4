//! What a person or a script sees: JSON events on stdout with `--json`, plain lines on
//! stderr otherwise, with progress redrawn in place when stderr is a terminal. The text of
//! the progress lines is in [`crate::progress`]; the events are [`crate::events::Event`].

use std::sync::{Arc, Mutex};

use crate::events::Event;

/// How events are shown: JSON lines on stdout, or plain lines on stderr, with progress
/// redrawn in place when stderr is a terminal.
#[derive(Clone)]
pub struct Output {
    pub json: bool,
    /// At a terminal: how many progress lines are drawn (to redraw them in place).
    live: Option<Arc<Mutex<usize>>>,
}

impl Output {
    pub fn new(json: bool) -> Self {
        use std::io::IsTerminal;
        Self {
            json,
            live: (!json && std::io::stderr().is_terminal()).then(Default::default),
        }
    }

    /// An event only JSON readers care about (nothing in plain mode).
    pub fn json_only(&self, event: &Event) {
        if self.json {
            println!("{}", event.to_line());
        }
    }

    /// Progress redraws in place (a terminal) rather than printing plain lines.
    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    /// An event: its JSON line, or the line `plain` makes.
    pub fn event(&self, event: &Event, plain: impl FnOnce() -> String) {
        if self.json {
            println!("{}", event.to_line());
        } else {
            self.clear_progress();
            eprintln!("{}", plain());
        }
    }

    /// A `progress` event: its JSON line, or `lines` drawn over the previous ones.
    pub fn progress(&self, event: &Event, lines: &[String]) {
        if self.json {
            println!("{}", event.to_line());
            return;
        }
        let mut text = String::new();
        if let Some(drawn) = &self.live {
            let mut drawn = drawn.lock().unwrap();
            text.push_str(&erase_lines(*drawn));
            *drawn = lines.len();
        }
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        eprint!("{text}");
    }

    fn clear_progress(&self) {
        if let Some(drawn) = &self.live {
            let mut drawn = drawn.lock().unwrap();
            if *drawn > 0 {
                eprint!("{}", erase_lines(*drawn));
                *drawn = 0;
            }
        }
    }
}

/// Terminal codes that move to the start of the `n` lines drawn last and clear from there
/// to the end of the screen.
fn erase_lines(n: usize) -> String {
    if n > 0 {
        format!("\x1b[{n}F\x1b[J")
    } else {
        "\x1b[J".to_string()
    }
}
