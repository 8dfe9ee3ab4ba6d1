//! Raw SQL that diesel keeps prepared.
//!
//! diesel never caches `sql_query` (nor `sql` literals): each execution is
//! parsed and analysed anew by the server, which for the write statement's
//! CTEs costs about as much server CPU as executing a small batch. A
//! [`PreparedSql`] is the same raw text with typed binds, declared safe to
//! cache, so diesel-async prepares it once per connection and then only
//! binds and executes it. Its plan is still made for each execution's
//! parameters (the connections set `plan_cache_mode = force_custom_plan`).

use std::marker::PhantomData;

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};
use diesel::QueryResult;

/// Raw SQL whose `$n` placeholders are bound in order: the first use of
/// each `$n` must come after the first use of `$n - 1`, and `bind` is
/// called once per parameter, in that order. A later use of a parameter
/// already bound refers to it again.
pub(crate) struct PreparedSql<'a> {
    sql: &'static str,
    binds: Vec<Box<dyn QueryFragment<Pg> + Send + 'a>>,
}

impl<'a> PreparedSql<'a> {
    pub(crate) fn new(sql: &'static str) -> Self {
        Self { sql, binds: Vec::new() }
    }

    /// Binds the next parameter.
    pub(crate) fn bind<ST, U>(mut self, value: U) -> Self
    where
        Pg: HasSqlType<ST>,
        U: ToSql<ST, Pg> + Send + 'a,
        ST: Send + 'a,
    {
        self.binds.push(Box::new(Bind {
            value,
            sql_type: PhantomData::<ST>,
        }));
        self
    }
}

impl QueryFragment<Pg> for PreparedSql<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let mut bound = 0;
        for piece in pieces(self.sql) {
            match piece {
                Piece::Text(text) => out.push_sql(text),
                // diesel writes `$k` for the k-th bind it is given.
                Piece::Parameter(n) if n == bound + 1 => {
                    let bind = self.binds.get(bound).ok_or_else(|| unbound(n))?;
                    bind.walk_ast(out.reborrow())?;
                    bound += 1;
                }
                Piece::Parameter(n) if n <= bound => out.push_sql(&format!("${n}")),
                Piece::Parameter(n) => return Err(unbound(n)),
            }
        }
        if bound == self.binds.len() {
            Ok(())
        } else {
            Err(diesel::result::Error::QueryBuilderError(
                format!("{} binds for {bound} parameters", self.binds.len()).into(),
            ))
        }
    }
}

fn unbound(n: usize) -> diesel::result::Error {
    diesel::result::Error::QueryBuilderError(format!("parameter ${n} is used before the ones before it").into())
}

impl QueryId for PreparedSql<'_> {
    type QueryId = ();
    // Cached by its SQL text and bind types.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for PreparedSql<'_> {
    type SqlType = Untyped;
}

struct Bind<ST, U> {
    value: U,
    sql_type: PhantomData<ST>,
}

impl<ST, U> QueryFragment<Pg> for Bind<ST, U>
where
    Pg: HasSqlType<ST>,
    U: ToSql<ST, Pg>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_bind_param::<ST, U>(&self.value)
    }
}

#[derive(Debug, PartialEq)]
enum Piece<'s> {
    Text(&'s str),
    Parameter(usize),
}

/// `sql` cut into text and `$n` parameters.
fn pieces(sql: &str) -> impl Iterator<Item = Piece<'_>> {
    let mut rest = sql;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
        match rest.strip_prefix('$') {
            Some(after) if digits(after) > 0 => {
                let len = digits(after);
                let n = after[..len].parse().ok()?;
                rest = &after[len..];
                Some(Piece::Parameter(n))
            }
            _ => {
                // Up to the next `$` that starts a parameter (a `$` that does
                // not, such as in a dollar-quoted string, stays text).
                let end = rest
                    .char_indices()
                    .skip(1)
                    .find(|&(i, c)| c == '$' && digits(&rest[i + 1..]) > 0)
                    .map_or(rest.len(), |(i, _)| i);
                let (text, after) = rest.split_at(end);
                rest = after;
                Some(Piece::Text(text))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_is_cut_at_each_parameter() {
        let cut: Vec<_> = pieces("SELECT $1::text, $2 WHERE x = $1 AND y = '$'").collect();
        assert_eq!(
            cut,
            [
                Piece::Text("SELECT "),
                Piece::Parameter(1),
                Piece::Text("::text, "),
                Piece::Parameter(2),
                Piece::Text(" WHERE x = "),
                Piece::Parameter(1),
                Piece::Text(" AND y = '$'"),
            ]
        );
    }

    /// diesel numbers binds in the order it is given them; the statements
    /// must introduce their parameters in that order.
    #[test]
    fn the_write_statements_introduce_their_parameters_in_order() {
        for sql in [
            super::super::statements::WRITE_ROWS_SQL,
            super::super::statements::WRITE_ROWS_WITH_FEED_SQL,
        ] {
            let mut introduced = 0;
            for piece in pieces(sql) {
                if let Piece::Parameter(n) = piece {
                    assert!(n <= introduced + 1, "${n} before ${}", introduced + 1);
                    introduced = introduced.max(n);
                }
            }
            assert!(introduced >= 8);
        }
    }
}
