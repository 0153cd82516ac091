-- Room on each page for a new version of every row on it. A dispatch round assigns the tasks
-- of a workflow together, and they sit together (they were created together): at fillfactor
-- 75 a page holds the new versions of only about a third of its rows (the old ones stay until
-- the transaction ends), so the rest of a large round moved to other pages, each move writing
-- an entry in every index (measured: 10,000 assignments in one statement wrote 24,000-40,000
-- WAL records; at 50, 10,000, and took 50-70 ms instead of 75-150). Pages filled before this
-- keep their fill until rewritten.
ALTER TABLE tasks SET (fillfactor = 50);
