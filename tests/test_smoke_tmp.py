from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.factory import make_ct


def test_echo_store(start_node):
    node = start_node()
    ae = AE("TESTSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    st = assoc.send_c_store(make_ct())
    assert st.Status == 0, st
    assoc.release()
    assert node.archive.counts()["instances"] == 1
