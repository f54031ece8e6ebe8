//! Small labelled inputs (every input has an accessible name) and number formatting.

use egui::{Color32, RichText, Ui};

/// A one-line text field with a label in front (its accessible name).
pub fn text_field(ui: &mut Ui, label: &str, value: &mut String, width: f32) -> egui::Response {
    ui.horizontal(|ui| {
        let l = ui.label(label);
        ui.add(egui::TextEdit::singleline(value).hint_text(label).desired_width(width)).labelled_by(l.id)
    })
    .inner
}

/// A drag value with a label in front.
pub fn number<T: egui::emath::Numeric>(ui: &mut Ui, label: &str, value: &mut T, range: std::ops::RangeInclusive<T>) -> egui::Response {
    ui.horizontal(|ui| {
        let l = ui.label(label);
        ui.add(egui::DragValue::new(value).range(range)).labelled_by(l.id)
    })
    .inner
}

pub use crate::peft::thousands as group;

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// `75` → `1 min 15 s`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

pub fn error_line(ui: &mut Ui, text: impl Into<String>) {
    ui.label(RichText::new(text.into()).color(Color32::from_rgb(230, 90, 80)));
}

pub fn ok_line(ui: &mut Ui, text: impl Into<String>) {
    ui.label(RichText::new(text.into()).color(Color32::from_rgb(110, 200, 120)));
}

/// `text` with the few symbols the engine writes that egui's bundled font cannot draw (arrows,
/// comparison signs) spelled in ASCII, so no box ("tofu") appears in the window.
pub fn drawable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '→' => out.push_str("->"),
            '←' => out.push_str("<-"),
            '≥' => out.push_str(">="),
            '≤' => out.push_str("<="),
            '‖' => out.push_str("||"),
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers_and_durations() {
        assert_eq!(group(18_725_888), "18,725,888");
        assert_eq!(group(64), "64");
        assert_eq!(duration(75.0), "1 min 15 s");
        assert_eq!(duration(3.4), "3 s");
        assert_eq!(duration(7300.0), "2 h 1 min");
        assert_eq!(mib(3 << 20), "3.0 MiB");
    }
}
