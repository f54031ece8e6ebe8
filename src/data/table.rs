//! CSV files (RFC 4180: fields holding commas, quotes or line breaks are quoted) through the
//! `csv-core` state machines: label manifests in, splits and reports out.

use csv_core::{ReadRecordResult, Reader, ReaderBuilder, WriteResult, Writer};

/// One record of a CSV text: its 1-based line and its fields (unquoted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub line: u64,
    pub fields: Vec<String>,
}

/// Parses CSV text; lines starting with `comment` are skipped, fields are trimmed and empty
/// records dropped. Errors name the line that is not valid UTF-8.
pub fn parse(text: &[u8], comment: Option<u8>) -> Result<Vec<Record>, String> {
    let mut reader: Reader = ReaderBuilder::new().comment(comment).build();
    let (mut output, mut ends) = (vec![0u8; 1024], vec![0usize; 16]);
    let (mut consumed, mut out_len, mut end_len) = (0, 0, 0);
    let mut records = Vec::new();
    loop {
        let (result, nin, nout, nend) = reader.read_record(&text[consumed..], &mut output[out_len..], &mut ends[end_len..]);
        consumed += nin;
        out_len += nout;
        end_len += nend;
        match result {
            // All input seen: the next call (with empty input) ends the last record.
            ReadRecordResult::InputEmpty => {}
            ReadRecordResult::OutputFull => output.resize(output.len() * 2, 0),
            ReadRecordResult::OutputEndsFull => ends.resize(ends.len() * 2, 0),
            ReadRecordResult::Record => {
                // The line the record ends on: the reader's line (1-based) is already past the
                // record's line break, if it had one.
                let unterminated = consumed == text.len() && !text.ends_with(b"\n");
                let line = reader.line() - 1 + u64::from(unterminated);
                let fields = fields(&output[..out_len], &ends[..end_len]).ok_or_else(|| format!("line {line}: not UTF-8 text"))?;
                if fields.iter().any(|f| !f.is_empty()) {
                    records.push(Record { line, fields });
                }
                (out_len, end_len) = (0, 0);
            }
            ReadRecordResult::End => return Ok(records),
        }
    }
}

fn fields(bytes: &[u8], ends: &[usize]) -> Option<Vec<String>> {
    let mut start = 0;
    ends.iter()
        .map(|&end| {
            let text = std::str::from_utf8(&bytes[start..end]).ok()?;
            start = end;
            Some(text.trim().to_string())
        })
        .collect()
}

/// Runs one step of the writer until it has written all of its input into `out`.
fn drain(out: &mut Vec<u8>, mut step: impl FnMut(&mut [u8]) -> (WriteResult, usize)) {
    let mut buf = [0u8; 256];
    loop {
        let (result, n) = step(&mut buf);
        out.extend_from_slice(&buf[..n]);
        if let WriteResult::InputEmpty = result {
            return;
        }
    }
}

/// Writes rows as CSV text (`\n` line ends), quoting the fields that need it.
pub fn write<R, F>(rows: R) -> Vec<u8>
where
    R: IntoIterator<Item = F>,
    F: IntoIterator,
    F::Item: AsRef<str>,
{
    let mut writer = Writer::new();
    let mut out = Vec::new();
    for row in rows {
        for (i, field) in row.into_iter().enumerate() {
            if i > 0 {
                drain(&mut out, |b| writer.delimiter(b));
            }
            let mut rest = field.as_ref().as_bytes();
            drain(&mut out, |b| {
                let (result, nin, nout) = writer.field(rest, b);
                rest = &rest[nin..];
                (result, nout)
            });
        }
        drain(&mut out, |b| writer.terminator(b));
    }
    drain(&mut out, |b| writer.finish(b));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_fields_round_trip_and_comments_are_skipped() {
        let rows = [vec!["path", "label"], vec!["a, with comma.png", "forest"], vec!["say \"hi\".png", "sea"], vec!["plain.png", ""]];
        let text = write(rows.iter().map(|r| r.iter()));
        assert_eq!(
            String::from_utf8(text.clone()).unwrap(),
            "path,label\n\"a, with comma.png\",forest\n\"say \"\"hi\"\".png\",sea\nplain.png,\n"
        );
        let back = parse(&text, None).unwrap();
        let fields: Vec<Vec<String>> = back.iter().map(|r| r.fields.clone()).collect();
        let expected: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|s| s.to_string()).collect()).collect();
        assert_eq!(fields, expected);
        assert_eq!(back.iter().map(|r| r.line).collect::<Vec<_>>(), [1, 2, 3, 4]);

        let parsed = parse(b"# comment\na.png , forest\n\nb.png,sea", Some(b'#')).unwrap();
        assert_eq!(parsed[0], Record { line: 2, fields: vec!["a.png".into(), "forest".into()] });
        assert_eq!(parsed[1], Record { line: 4, fields: vec!["b.png".into(), "sea".into()] });
        assert_eq!(parsed.len(), 2);
        let lines: Vec<u64> = parse(b"h\n\"two\nlines\"\n# c\nx\nlast", Some(b'#')).unwrap().iter().map(|r| r.line).collect();
        assert_eq!(lines, [1, 3, 5, 6]);
        let long = "x".repeat(5_000);
        assert_eq!(parse(write([[long.as_str(), "y"]]).as_slice(), None).unwrap()[0].fields[0], long);
    }
}
