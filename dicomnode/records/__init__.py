"""The records room (layer 3): what the web face and the analysis service read from the
stores, and the bookkeeping they keep there, without reaching the archive themselves.

Layer 4 (scp, dicomweb, analysis) never touches ``dicomnode.archive``; it asks the rooms of
layer 3. Intake, egress and stewardship take data in, let it out and change it on someone's
word, each deciding and recording. This room serves the rest:

- the DPO's oversight reads: ledger views and checkpoints, verification of the chain, legal
  holds, restrictions, objects quarantined at intake, the delivery outbox, policy activations
  (`Oversight`); every one of them is a read of governance's own records, shown only to a
  signed-in DPO or auditor, or to a token with the governance scope, as before;
- the pages' accounts and sessions, the node's signing of JSON, the audit log sender, health
  pings and storage figures (`Records`);
- the analysis service's job table, the instances of a unit and their headers, and staged
  copies of its files for analyzers that need paths (`Workbench`).

What is shown about patients in answers (QIDO, WADO, C-FIND, C-MOVE, job records) still
leaves through egress, which decides and records first; the job API asks egress before it
shows a job record.
"""

from __future__ import annotations

from dicomnode.records.oversight import Oversight
from dicomnode.records.records import Records
from dicomnode.records.workbench import Workbench

__all__ = ["Oversight", "Records", "Workbench"]
