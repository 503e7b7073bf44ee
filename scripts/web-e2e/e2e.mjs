// End-to-end test of the conformance and benchmark page: opens it in
// headless Chromium (WebGPU on the browser's SwiftShader adapter where
// there is no GPU), waits for it to finish, checks that every conformance
// row passes, saves the bench JSON the page offers and a screenshot, and
// clicks the download button (its file must hold the same JSON).
//
// usage: node e2e.mjs URL OUTDIR   (CHROMIUM overrides /usr/bin/chromium)
// Exits 0 when the page finished with every row PASS and a JSON; prints
// why otherwise. OUTDIR/bench.json and OUTDIR/page.png are written.
import fs from 'node:fs';
import path from 'node:path';
import puppeteer from 'puppeteer-core';

const [url, outdir] = process.argv.slice(2);
if (!url || !outdir) {
  console.error('usage: node e2e.mjs URL OUTDIR');
  process.exit(2);
}
fs.mkdirSync(outdir, { recursive: true });
const minutes = Number(process.env.WEB_E2E_MINUTES || 40);

const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox', '--enable-unsafe-webgpu', '--disable-gpu-sandbox', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--disable-dev-shm-usage', `--user-data-dir=${path.join(outdir, 'profile')}`,
  ],
  protocolTimeout: minutes * 60 * 1000,
});
let failed = false;
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 1100, height: 900 });
  page.on('console', (m) => { if (m.type() === 'error') console.error(`page: ${m.text()}`); });
  page.on('pageerror', (e) => console.error(`page error: ${e}`));
  await page.goto(url, { waitUntil: 'load' });
  await page.waitForFunction(
    () => ['done', 'failed'].includes(document.body.dataset.state),
    { timeout: minutes * 60 * 1000, polling: 1000 },
  );
  const state = await page.evaluate(() => document.body.dataset.state);
  const status = await page.evaluate(() => document.getElementById('status').textContent);
  console.log(`page: ${state}: ${status}`);
  const rows = await page.evaluate(() =>
    [...document.querySelectorAll('#cases tr')].map((r) => [...r.cells].map((c) => c.textContent)));
  const bad = rows.filter((r) => r[2] !== 'PASS');
  console.log(`conformance: ${rows.length - bad.length}/${rows.length} rows PASS`);
  for (const r of bad) console.log(`FAIL ${r.join(' | ')}`);
  const json = await page.evaluate(() => window.benchJson || null);
  if (json) fs.writeFileSync(path.join(outdir, 'bench.json'), json);
  await page.screenshot({ path: path.join(outdir, 'page.png'), fullPage: true });
  // the button a person clicks: its download holds the same JSON
  let downloaded = false;
  if (json) {
    const downloads = path.join(outdir, 'downloads');
    fs.mkdirSync(downloads, { recursive: true });
    const cdp = await page.createCDPSession();
    await cdp.send('Browser.setDownloadBehavior', { behavior: 'allow', downloadPath: downloads });
    await page.click('#download');
    const file = path.join(downloads, 'wgpu-batchnorm-bench.json');
    for (let i = 0; i < 100 && !downloaded; i++) {
      await new Promise((r) => setTimeout(r, 200));
      downloaded = fs.existsSync(file) && fs.readFileSync(file, 'utf8') === json;
    }
    console.log(downloaded ? 'download: the button saved the JSON' : 'download: the button saved nothing (or other bytes) in 20 s');
  }
  failed = state !== 'done' || rows.length === 0 || bad.length > 0 || !json || !downloaded;
  if (!json) console.log('the page offered no bench JSON');
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
