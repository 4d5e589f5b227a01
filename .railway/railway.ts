// Railway Infrastructure as Code for the WhatsApp AI bot: one service, one replica, a volume at DATA_DIR.
//
//   railway config plan    # preview against the linked environment
//   railway config apply   # apply (asks first)
//
// It describes the same service as ../railway.json (Config as Code, for services that already use it).
// A service is managed by one of the two, never both: see the README's deploy section.
// Checked by tests/test_deploy.py: `tsc --noEmit -p .railway` against the `railway` package's own types,
// and the evaluated program's values against railway.json.
import { defineRailway, preserve, project, service, volume } from "railway/iac";

/** Where the bot keeps its SQLite store and WhatsApp session; the volume is mounted here. */
const DATA_DIR = "/data";

export default defineRailway(() => {
  const data = volume("whatsapp-bot-data");

  const bot = service("whatsapp-bot", {
    // The Dockerfile at the repository root: Python 3.11 slim, ffmpeg, libmagic, a non-root user.
    build: { builder: "DOCKERFILE", dockerfilePath: "Dockerfile" },
    start: "python -m bot run",
    // /health answers 200 while the process is up, also while it waits for a QR scan or for the
    // session lease, so a deploy turns healthy before the previous one is stopped.
    healthcheck: "/health",
    healthcheckTimeout: 60,
    // One WhatsApp session, one instance. A volume also keeps Railway from running two deployments at once.
    replicas: 1,
    deploy: {
      restartPolicyType: "ON_FAILURE",
      restartPolicyMaxRetries: 10,
      overlapSeconds: 0,
      drainingSeconds: 15,
    },
    volumeMounts: { [DATA_DIR]: data },
    env: {
      APP_ENV: "production",
      LOG_JSON: "true",
      DATA_DIR,
      // Railway mounts volumes owned by root; the image runs as a non-root user, which could not write there.
      RAILWAY_RUN_UID: "0",
      // Secrets are set in the dashboard (or `railway variables`); keep whatever value is there.
      OPENAI_API_KEY: preserve(),
      ADMIN_TOKEN: preserve(),
      SUPABASE_URL: preserve(),
      SUPABASE_KEY: preserve(),
      SUPABASE_DB_URL: preserve(),
    },
  });

  return project("whatsapp-ai-bot", { resources: [bot, data] });
});
