"""Debian's Orthanc (with its DICOMweb plugin) started on loopback with a generated
configuration: the node is a DICOMweb server it can query, retrieve from and store to (its
`/dicom-web/servers/node/...` routes, with the node's bearer token in HttpHeaders), and a DICOM
modality it can C-STORE to, C-FIND and C-MOVE from."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.conftest import free_port, wait_until

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
AE_TITLE = "ORTHANC"


@dataclass
class Orthanc:
    process: subprocess.Popen
    http_port: int
    dicom_port: int
    folder: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str, **kwargs) -> requests.Response:
        response = requests.get(self.url + path, timeout=60, **kwargs)
        response.raise_for_status()
        return response

    def post(self, path: str, body: object = None, data: bytes | None = None) -> requests.Response:
        response = requests.post(
            self.url + path,
            json=body if data is None else None,
            data=data,
            timeout=120,
        )
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response

    def log(self) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_orthanc(
    folder: Path,
    node_ae: str,
    node_dimse_port: int,
    node_dicomweb: str,
    token: str,
    dicom_port: int | None = None,
) -> Orthanc:
    """Orthanc on loopback (`dicom_port`, else a free one; a free HTTP port) with the node as
    modality "node" and DICOMweb server "node"; returns once its REST API answers."""
    for path in (ORTHANC, DICOMWEB_PLUGIN):
        assert Path(path).exists(), (
            f"{path} is missing: apt-get install orthanc orthanc-dicomweb (.ci/run installs them)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), dicom_port or free_port()
    config = {
        "Name": "dicomnode-test-orthanc",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": AE_TITLE,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "StableAge": 1,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomModalities": {"node": [node_ae, "127.0.0.1", node_dimse_port]},
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {
                "node": {
                    "Url": node_dicomweb.rstrip("/") + "/",
                    "HttpHeaders": {"Authorization": f"Bearer {token}"},
                }
            },
        },
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = (folder / "orthanc.log").open("wb")
    process = subprocess.Popen(
        [ORTHANC, "--logfile=" + str(folder / "orthanc.log"), str(config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=folder,
    )
    orthanc = Orthanc(process, http_port, dicom_port, folder)

    def answers() -> bool:
        assert process.poll() is None, f"Orthanc exited early:\n{orthanc.log()[-3000:]}"
        try:
            return requests.get(orthanc.url + "/system", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_until(answers, 60, "Orthanc to answer")
    except BaseException:
        orthanc.stop()
        raise
    return orthanc
