//! A strict bencode decoder for untrusted input.
//!
//! Encoding goes through `lava_torrent`'s `BencodeElem` (it sorts dictionary keys as BEP 3
//! requires). Decoding is ours because `lava_torrent`'s reader recurses without a depth limit
//! (a few MB of `l` overflow the stack) and re-encodes the info dictionary to hash it, which
//! gives a wrong info hash for any file whose info dictionary is not canonically encoded. This
//! decoder keeps every value's raw byte span, so the info hash is the SHA-1 of the bytes as
//! they were sent, and refuses deep nesting, non-canonical integers, duplicate keys and
//! trailing data.

use std::ops::Range;

/// Nesting deeper than this is refused (real metainfo nests 4 levels).
pub const MAX_DEPTH: usize = 32;

/// A decoded value borrowing from the input.
#[derive(Debug, Clone, PartialEq)]
pub enum Bencode<'a> {
    Int(i64),
    Bytes(&'a [u8]),
    List(Vec<Node<'a>>),
    /// Keys in input order.
    Dict(Vec<(&'a [u8], Node<'a>)>),
}

/// A value with the span of input bytes it was decoded from.
#[derive(Debug, Clone, PartialEq)]
pub struct Node<'a> {
    pub value: Bencode<'a>,
    pub span: Range<usize>,
}

impl<'a> Node<'a> {
    /// Dictionary lookup.
    pub fn get(&self, key: &str) -> Option<&Node<'a>> {
        match &self.value {
            Bencode::Dict(items) => items
                .iter()
                .find(|(k, _)| *k == key.as_bytes())
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self.value {
            Bencode::Int(i) => Some(i),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&'a [u8]> {
        match self.value {
            Bencode::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// A byte string that is UTF-8.
    pub fn as_str(&self) -> Option<&'a str> {
        self.as_bytes().and_then(|b| std::str::from_utf8(b).ok())
    }

    pub fn as_list(&self) -> Option<&[Node<'a>]> {
        match &self.value {
            Bencode::List(items) => Some(items),
            _ => None,
        }
    }
}

/// Why input is not acceptable bencode, with the byte offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bencode error at byte {offset}: {message}")]
pub struct DecodeError {
    pub offset: usize,
    pub message: String,
}

/// Decode exactly one value spanning all of `input`.
pub fn decode(input: &[u8]) -> Result<Node<'_>, DecodeError> {
    let mut d = Decoder { input, pos: 0 };
    let node = d.value(0)?;
    if d.pos != input.len() {
        return Err(d.err("trailing data after the top-level value"));
    }
    Ok(node)
}

struct Decoder<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    fn err(&self, message: &str) -> DecodeError {
        DecodeError {
            offset: self.pos,
            message: message.to_owned(),
        }
    }

    fn peek(&self) -> Result<u8, DecodeError> {
        self.input
            .get(self.pos)
            .copied()
            .ok_or_else(|| self.err("unexpected end of input"))
    }

    fn value(&mut self, depth: usize) -> Result<Node<'a>, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nested too deep"));
        }
        let start = self.pos;
        let value = match self.peek()? {
            b'i' => {
                self.pos += 1;
                let v = self.integer(b'e')?;
                Bencode::Int(v)
            }
            b'l' => {
                self.pos += 1;
                let mut items = Vec::new();
                while self.peek()? != b'e' {
                    items.push(self.value(depth + 1)?);
                }
                self.pos += 1;
                Bencode::List(items)
            }
            b'd' => {
                self.pos += 1;
                let mut items: Vec<(&'a [u8], Node<'a>)> = Vec::new();
                while self.peek()? != b'e' {
                    let key_at = self.pos;
                    if !self.peek()?.is_ascii_digit() {
                        return Err(self.err("dictionary key is not a byte string"));
                    }
                    let key = self.bytes()?;
                    if items.iter().any(|(k, _)| *k == key) {
                        self.pos = key_at;
                        return Err(self.err("duplicate dictionary key"));
                    }
                    let v = self.value(depth + 1)?;
                    items.push((key, v));
                }
                self.pos += 1;
                Bencode::Dict(items)
            }
            b'0'..=b'9' => Bencode::Bytes(self.bytes()?),
            _ => return Err(self.err("expected i, l, d or a digit")),
        };
        Ok(Node {
            value,
            span: start..self.pos,
        })
    }

    /// Digits up to `end` as a canonical integer (no leading zeros, no `-0`).
    fn integer(&mut self, end: u8) -> Result<i64, DecodeError> {
        let start = self.pos;
        let len = self.input[start..]
            .iter()
            .take(21)
            .position(|&b| b == end)
            .ok_or_else(|| self.err("integer not terminated (or longer than 20 digits)"))?;
        let text = &self.input[start..start + len];
        let digits = text.strip_prefix(b"-").unwrap_or(text);
        let canonical = !digits.is_empty()
            && digits.iter().all(u8::is_ascii_digit)
            && (digits == b"0" || digits[0] != b'0')
            && text != b"-0";
        if !canonical {
            return Err(self.err("not a canonical integer"));
        }
        let v = std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
            .ok_or_else(|| self.err("integer out of range"))?;
        self.pos = start + len + 1;
        Ok(v)
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let at = self.pos;
        let n = self.integer(b':')?;
        let n = usize::try_from(n).map_err(|_| DecodeError {
            offset: at,
            message: "negative length".into(),
        })?;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.input.len())
            .ok_or_else(|| DecodeError {
                offset: at,
                message: format!("string of {n} bytes runs past the end"),
            })?;
        let b = &self.input[self.pos..end];
        self.pos = end;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_with_spans() {
        let input = b"d3:fooli1ei-2ee4:info d1:ai0eee".to_vec();
        let input: Vec<u8> = input.into_iter().filter(|&b| b != b' ').collect();
        let root = decode(&input).unwrap();
        let info = root.get("info").unwrap();
        assert_eq!(&input[info.span.clone()], b"d1:ai0ee");
        assert_eq!(
            root.get("foo").unwrap().as_list().unwrap()[1].as_int(),
            Some(-2)
        );
    }

    #[test]
    fn refuses_what_is_not_canonical_or_safe() {
        for bad in [
            &b"i01e"[..],
            b"i-0e",
            b"ie",
            b"i1",
            b"5:abc",
            b"d1:ai1e1:ai2ee",
            b"di1ei2ee",
            b"i1ei2e",
            b"x",
            b"-1:a",
            b"99999999999999999999999:a",
        ] {
            assert!(
                decode(bad).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = [vec![b'l'; 10_000], vec![b'e'; 10_000]].concat();
        assert!(decode(&deep).unwrap_err().message.contains("deep"));
    }
}
