-- The attempt of the task its requester released to wait for this handoff's decision (NULL: not
-- released). A declined or expired handoff puts the task back to ready only if it still waits at
-- that attempt — found by the fencing token, not by the text of its error.
ALTER TABLE handoffs ADD COLUMN parked_attempt integer;

UPDATE handoffs h SET parked_attempt = t.attempt
FROM tasks t
WHERE h.status = 'requested' AND t.id = h.task_id AND t.status = 'retry_wait'
  AND t.error = 'waiting for a handoff';
