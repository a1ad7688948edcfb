"""OHIF Viewer's prebuilt dist/ (npm @ohif/app, unpacked by tests/run.sh into .cache/ohif/) served on loopback,
with an app-config.js whose one data source is the PACS's DICOMweb, reached through this same server at
/dicom-web (one origin: the browser needs no CORS from the PACS).
"""

from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request
from pathlib import Path

from tests.peers import REPO, free_port

OHIF_VERSION = "3.13.2"
OHIF_DIST = REPO / ".cache" / "ohif" / OHIF_VERSION / "package" / "dist"

_APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  defaultDataSourceName: 'pacs',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'pacs',
      configuration: {
        friendlyName: 'test PACS',
        name: 'pacs',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      },
    },
  ],
};
"""


def _handler(dist: Path, pacs_http_port: int) -> type[http.server.SimpleHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(dist), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path.startswith("/dicom-web/"):
                self._proxy()
            elif path == "/app-config.js":
                self._send(200, _APP_CONFIG.encode(), "application/javascript")
            elif (dist / path.lstrip("/")).is_file():
                super().do_GET()
            else:  # the viewer's own routes (/viewer?StudyInstanceUIDs=...): the single-page app
                self._send(200, (dist / "index.html").read_bytes(), "text/html")

        def _proxy(self) -> None:
            request = urllib.request.Request(
                f"http://127.0.0.1:{pacs_http_port}{self.path}",
                headers={k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")},
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as rsp:
                    self._send(rsp.status, rsp.read(), rsp.headers.get("Content-Type", ""))
            except urllib.error.HTTPError as exc:
                self._send(exc.code, exc.read(), exc.headers.get("Content-Type", "text/plain"))

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class ViewerServer:
    """The viewer on http://127.0.0.1:<port>/, its DICOMweb data source the PACS on ``pacs_http_port``."""

    def __init__(self, pacs_http_port: int, dist: Path = OHIF_DIST) -> None:
        if not (dist / "index.html").is_file():
            raise FileNotFoundError(f"OHIF dist not found at {dist}: run tests/run.sh (it installs it from npm)")
        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _handler(dist, pacs_http_port))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="viewer-http")

    def start(self) -> ViewerServer:
        self.thread.start()
        return self

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def dicomweb_plugin_config() -> dict[str, object]:
    """Orthanc settings for Debian's orthanc-dicomweb plugin at /dicom-web/."""
    return {
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "Ssl": False,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        },
    }
